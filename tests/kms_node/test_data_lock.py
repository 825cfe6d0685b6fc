"""One serving instance per data directory (kms_node/data_lock.py): a second is refused
at once, before it opens the HSM, and the directory is free again when the first lets go
(the kernel lets go when its process ends, however it ends)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import MagicMock, patch

import pytest

from core.errors import PreconditionFailed
from kms_node import data_lock, server, supervisor
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.settings import NodeSettings, PinSource


def test_a_second_serving_instance_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    first = data_lock.hold_as_the_serving_instance(tmp_path)
    with pytest.raises(PreconditionFailed, match="another kms-node serves from it"):
        data_lock.hold_as_the_serving_instance(tmp_path)
    # Worker processes share the directory with their instance (and with each other).
    data_lock.hold_while_serving(tmp_path)
    os.close(first)
    os.close(data_lock.hold_as_the_serving_instance(tmp_path))


def test_another_directory_is_another_node(tmp_path: Path) -> None:
    one = data_lock.hold_as_the_serving_instance(tmp_path / "node-1")
    two = data_lock.hold_as_the_serving_instance(tmp_path / "node-2")
    os.close(one)
    os.close(two)


def _settings(data_dir: Path, processes: int = 1) -> NodeSettings:
    return NodeSettings(
        node_id="node-1",
        listen="127.0.0.1:0",
        chain_rpc_url="http://127.0.0.1:1",
        registry_address="0x" + "ab" * 20,
        data_dir=data_dir,
        hsm_module="/nonexistent/libpkcs11.so",
        hsm_token_label="node-1",
        hsm_pin=PinSource("hsm_pin", env="NODE_PIN", env_value="not-a-real-pin"),
        dev_plaintext=True,
        processes=processes,
    )


@pytest.fixture
def hsm_opens() -> Iterator[MagicMock]:
    """Pkcs11KeyStore.open, recording its calls (and stopping there if called); core
    dumps left as they are in the test process."""
    with (
        patch.object(server, "forbid_core_dumps"),
        patch.object(supervisor, "forbid_core_dumps"),
        patch.object(Pkcs11KeyStore, "open", side_effect=RuntimeError("the HSM was opened")) as op,
    ):
        yield op


def test_a_second_serve_is_refused_before_it_opens_the_hsm(
    tmp_path: Path, hsm_opens: MagicMock
) -> None:
    held = data_lock.hold_as_the_serving_instance(tmp_path)
    with pytest.raises(PreconditionFailed, match="another kms-node serves from it"):
        server.serve(_settings(tmp_path))
    assert hsm_opens.call_count == 0
    os.close(held)


def test_a_second_node_of_several_processes_is_refused_before_any_worker_starts(
    tmp_path: Path, hsm_opens: MagicMock
) -> None:
    """Its workers open the HSM; the supervisor is refused before it starts one."""
    held = data_lock.hold_as_the_serving_instance(tmp_path)
    with (
        patch("subprocess.Popen", side_effect=RuntimeError("started")) as start,
        pytest.raises(PreconditionFailed, match="another kms-node serves from it"),
    ):
        supervisor.supervise(_settings(tmp_path, processes=2), ["kms-node", "serve"])
    assert start.call_count == 0 and hsm_opens.call_count == 0
    os.close(held)
