"""Where network namespaces cannot be made, the multi-host run says why and fails: it
never passes by doing nothing (deploy/netns.py)."""

from __future__ import annotations

import os
import shutil

import pytest

from core.errors import PreconditionFailed
from deploy import netns
from deploy.netns import HostNetwork


def test_without_root_the_check_names_the_reason_and_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netns.main(["check"]) == 1
    assert "needs root" in capsys.readouterr().err
    with pytest.raises(PreconditionFailed, match="needs root"):
        HostNetwork.create("nt")


def test_without_the_ip_command_the_check_names_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda _: None)
    reason = netns.unavailable()
    assert reason is not None and "iproute2" in reason


def test_the_check_takes_one_word(capsys: pytest.CaptureFixture[str]) -> None:
    assert netns.main([]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["", "toolongx", "a-b", "a b"])
def test_a_network_prefix_is_short_and_plain(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        HostNetwork(prefix)
