"""A registry refusal a person can act on ends with the command to run next."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cli import kmsctl as kmsctl_module
from cli.kmsctl import _NEXT_STEPS, build_parser
from contracts.build import load_artifact
from core.errors import ChainRejected, ChainUnavailable
from tests.cli.test_account import kmsctl


def test_every_hint_answers_an_error_the_registry_has() -> None:
    errors = {e["name"] for e in load_artifact()["abi"] if e.get("type") == "error"}
    assert set(_NEXT_STEPS) <= errors


@pytest.mark.parametrize("reason", sorted(_NEXT_STEPS))
def test_every_command_a_hint_names_is_one_kmsctl_has(reason: str) -> None:
    for group, action in re.findall(r"kmsctl (\w+) ([\w-]+)", _NEXT_STEPS[reason]):
        # argparse exits on an unknown command; --help exits 0 only for a known one
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([group, action, "--help"])
        assert exited.value.code == 0, (reason, group, action)


def _refused_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def refuse(args: argparse.Namespace) -> None:
        raise error

    monkeypatch.setattr(kmsctl_module, "cmd_patient", refuse)


def test_patient_not_registered_says_to_register_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _refused_with(
        monkeypatch,
        ChainRejected(
            "registry rejected anchorRecord: PatientNotRegistered", "PatientNotRegistered"
        ),
    )
    record = tmp_path / "r.json"
    code, _, err = kmsctl("patient", "store", str(record), "--type", "lab_result")
    assert code == 1
    assert err.splitlines() == [
        "kmsctl: registry rejected anchorRecord: PatientNotRegistered",
        "kmsctl: next: the patient registers first: kmsctl patient register",
    ]


@pytest.mark.parametrize(
    "error",
    [
        ChainRejected("registry rejected x: Unknown", "Unknown"),
        ChainRejected("chain refused x: nonce too low"),
        ChainUnavailable("chain at http://127.0.0.1:1 unavailable"),
    ],
)
def test_no_hint_where_there_is_no_known_next_step(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    _refused_with(monkeypatch, error)
    code, _, err = kmsctl("patient", "register")
    assert code == 1
    assert len(err.splitlines()) == 1 and "next:" not in err
