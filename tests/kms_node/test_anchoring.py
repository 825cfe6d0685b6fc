"""Audit checkpoints anchored on a real chain (anvil), sent from the node's HSM-held account."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.registry import RegistryClient
from core.audit import Checkpoint, verify_checkpoint, verify_checkpoint_consistency
from core.errors import ChainUnavailable, InvalidRequest
from core.registry_interface import TxSigner
from deploy.anvil import AnvilProcess, rpc_call, set_balance
from kms_node import metrics
from kms_node.anchoring import Anchorer, AnchorOutcome, HsmTxSigner, anchors_here
from kms_node.audit_log import AuditLog
from kms_node.keystore import KeyStore, MemoryKeyStore
from tests.kms_node.test_audit_log import make_entry

pytestmark = pytest.mark.anvil

NODE = "node-1"
FUNDING_WEI = 10**20
#: interval_s of the anchorers on a fake clock, so also how often their thread looks (it polls
#: at most every interval_s); on that clock the interval passes only when a test advances it.
#: A binary fraction, so that the clock's sums are exact.
INTERVAL_S = 1 / 16


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with AnvilProcess(log_path=tmp_path_factory.mktemp("anvil") / "anvil.log") as process:
        yield process


@pytest.fixture
def admin(anvil: AnvilProcess) -> LocalAccount:
    account: LocalAccount = Account.create()
    set_balance(anvil.rpc_url, account.address, FUNDING_WEI)
    return account


@pytest.fixture
def registry(anvil: AnvilProcess, admin: LocalAccount) -> RegistryClient:
    return RegistryClient.deploy(anvil.rpc_url, admin)


def register(
    registry: RegistryClient, admin: LocalAccount, keys: KeyStore, *, fund: bool = True
) -> None:
    registry.register_node(
        admin,
        node_id=NODE,
        endpoint="127.0.0.1:1",
        signing_public_key=keys.signing_public_key(),
        delivery_public_key=keys.delivery_public_key(),
        account=keys.eth_address(),
    )
    if fund:
        set_balance(registry.rpc_url, keys.eth_address(), FUNDING_WEI)


@pytest.fixture
def dead_rpc_url() -> str:
    """An http URL where nothing listens; its path stands in for a hosted RPC's API key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/some-api-key"


@pytest.fixture
def keys() -> MemoryKeyStore:
    return MemoryKeyStore()


class FakeClock:
    """A monotonic clock that moves only when a test advances it. It counts its reads: the
    anchorer reads it at every look at its schedule (:meth:`Anchorer.due`), so a test waits
    for its thread to have looked instead of sleeping."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._reads = 0
        self._read = threading.Condition()

    def __call__(self) -> float:
        with self._read:
            self._reads += 1
            self._read.notify_all()
            return self._now

    def advance(self, seconds: float) -> None:
        with self._read:
            self._now += seconds

    def wait_for_reads(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until the clock has been read ``count`` more times."""
        with self._read:
            target = self._reads + count
            assert self._read.wait_for(lambda: self._reads >= target, timeout_s), (
                "the clock was not read in time"
            )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_log(tmp_path: Path) -> Iterator[Callable[[KeyStore, str], AuditLog]]:
    """Opens audit logs (closed after the test); a name per log."""
    opened: list[AuditLog] = []

    def open_(keys: KeyStore, name: str = "audit") -> AuditLog:
        log = AuditLog(tmp_path / f"{name}.sqlite", keys, NODE)
        opened.append(log)
        return log

    yield open_
    for log in opened:
        log.close()


def fill(log: AuditLog, indices: range, tag: str = "") -> None:
    log.append_many([make_entry(i, tag=tag) for i in indices])


def anchorer_for(
    log: AuditLog,
    registry: Any,
    keys: KeyStore,
    *,
    every_entries: int = 1000,
    interval_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Anchorer:
    return Anchorer(
        log,
        registry,
        HsmTxSigner(keys),
        every_entries=every_entries,
        interval_s=interval_s,
        clock=clock,
    )


def latest_anchor(registry: RegistryClient) -> tuple[int, bytes]:
    """Tree size and root of the node's latest anchor, which there must be."""
    latest = registry.latest_checkpoint(NODE)
    assert latest is not None
    return latest[0], latest[1]


def anchors_total(outcome: AnchorOutcome) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "kms_node_audit_anchors_total", {"outcome": str(outcome)}
    )
    return value or 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- the transaction signer --------------------------------------------------------------


def transfer(signer: HsmTxSigner, **extra: Any) -> dict[str, Any]:
    return {
        "from": signer.address,
        "chainId": 31337,
        "nonce": 0,
        "gas": 21_000,
        "maxFeePerGas": 2 * 10**9,
        "maxPriorityFeePerGas": 10**9,
        "to": Account.create().address,
        "value": 1,
        "data": "0x",
        **extra,
    }


def test_the_tx_signer_signs_for_the_keystore_account(keys: MemoryKeyStore) -> None:
    signer = HsmTxSigner(keys)
    assert signer.address == keys.eth_address()
    tx: TxSigner = signer  # the registry adapter's protocol
    raw = tx.sign_raw_transaction(transfer(signer))
    assert Account.recover_transaction(raw) == keys.eth_address()
    assert keys.eth_address() in repr(signer)


def test_the_tx_signer_refuses_another_sender_and_unknown_fields(keys: MemoryKeyStore) -> None:
    signer = HsmTxSigner(keys)
    with pytest.raises(InvalidRequest, match="this signer is"):
        signer.sign_raw_transaction(transfer(signer, **{"from": Account.create().address}))
    with pytest.raises(InvalidRequest, match="gasPrice"):
        signer.sign_raw_transaction(transfer(signer, gasPrice=10**9))


def test_one_process_per_node_anchors() -> None:
    assert anchors_here(True, None) and anchors_here(True, 0)
    assert not anchors_here(True, 1) and not anchors_here(False, None)
    assert not anchors_here(False, 0)


# --- anchoring ---------------------------------------------------------------------------


def test_checkpoints_are_anchored_with_the_logs_size_root_and_the_nodes_keys(
    anvil: AnvilProcess,
    registry: RegistryClient,
    admin: LocalAccount,
    keystore: KeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
) -> None:
    """With every key store (the in-memory twin and SoftHSM)."""
    register(registry, admin, keystore)
    log = open_log(keystore, "audit")
    anchorer = anchorer_for(log, registry, keystore)
    fill(log, range(3))

    assert anchorer.anchor_once() is AnchorOutcome.ANCHORED
    latest = registry.latest_checkpoint(NODE)
    assert latest is not None and latest[:2] == (3, log.root(3))
    assert metrics.REGISTRY.get_sample_value("kms_node_audit_anchored_tree_size") == 3
    # The transaction came from the node's account, signed inside its key store...
    assert anchorer.last_anchored is not None
    tx = rpc_call(anvil.rpc_url, "eth_getTransactionByHash", [anchorer.last_anchored.tx_hash])
    assert tx["from"].lower() == keystore.eth_address().lower()

    fill(log, range(3, 8))
    assert anchorer.anchor_once() is AnchorOutcome.ANCHORED
    anchors = registry.checkpoint_anchors(NODE)
    assert [(a.tree_size, a.root_hash) for a in anchors] == [(3, log.root(3)), (8, log.root(8))]
    # ...and each anchor is a checkpoint signed by the node's audit key, the later one
    # an extension of the earlier one (RFC 9162 consistency).
    old, new = (
        Checkpoint(NODE, a.tree_size, a.root_hash, a.timestamp, a.signature) for a in anchors
    )
    assert verify_checkpoint(old, keystore.signing_public_key())
    assert verify_checkpoint(new, keystore.signing_public_key())
    assert verify_checkpoint_consistency(old, new, log.consistency_proof(3, 8))


def test_back_to_back_anchors_in_one_second_are_mined(
    registry: RegistryClient, admin: LocalAccount, keys: MemoryKeyStore
) -> None:
    """Regression: gas is estimated at the latest block, where the previous anchor was mined;
    with an unchanged timestamp the estimate saw the store of block.number as a no-op and
    the anchor reverted out of gas."""
    register(registry, admin, keys)
    signer = HsmTxSigner(keys)
    for size in (3, 8, 9):
        registry.anchor_checkpoint(
            signer,
            node_id=NODE,
            tree_size=size,
            root_hash=bytes([size]) * 32,
            timestamp=1_700_000_000,
            signature=b"s" * 70,
        )
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [3, 8, 9]


def test_nothing_is_anchored_without_new_entries(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    clock: FakeClock,
) -> None:
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    anchorer = anchorer_for(log, registry, keys, interval_s=60, clock=clock)
    clock.advance(60)
    assert not anchorer.due()
    assert anchorer.anchor_once() is AnchorOutcome.NOTHING_NEW  # an empty log
    fill(log, range(2))
    assert not anchorer.due()  # too few entries, and the interval has not passed
    clock.advance(60)
    assert anchorer.due()
    assert anchorer.anchor_once() is AnchorOutcome.ANCHORED
    clock.advance(60)
    assert not anchorer.due()
    assert anchorer.anchor_once() is AnchorOutcome.NOTHING_NEW
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [2]


def test_the_thread_anchors_after_enough_entries(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    clock: FakeClock,
) -> None:
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    fill(log, range(2))  # left unanchored by a previous run
    anchorer = anchorer_for(
        log, registry, keys, every_entries=5, interval_s=INTERVAL_S, clock=clock
    )
    anchorer.start()
    try:
        # The first round, at start-up, anchors what is outstanding.
        wait_for(lambda: registry.latest_checkpoint(NODE) is not None, 5)
        fill(log, range(2, 6))
        # A few looks: four entries are not enough, and the clock stands still.
        clock.wait_for_reads(3)
        assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [2]
        fill(log, range(6, 7))
        wait_for(lambda: len(registry.checkpoint_anchors(NODE)) == 2, 5)
        assert latest_anchor(registry) == (7, log.root(7))
    finally:
        anchorer.stop()


def test_the_thread_anchors_after_the_interval(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    clock: FakeClock,
) -> None:
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    fill(log, range(1))
    anchorer = anchorer_for(
        log, registry, keys, every_entries=1000, interval_s=INTERVAL_S, clock=clock
    )
    anchorer.start()
    try:
        wait_for(lambda: registry.latest_checkpoint(NODE) is not None, 5)  # at start-up
        fill(log, range(1, 3))
        clock.wait_for_reads(3)
        assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1]  # not yet
        clock.advance(INTERVAL_S)
        wait_for(lambda: (registry.latest_checkpoint(NODE) or (0,))[0] == 3, 5)
    finally:
        anchorer.stop()
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1, 3]


# --- failures ----------------------------------------------------------------------------


def test_an_unreachable_chain_is_logged_and_counted_not_raised(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    dead_rpc_url: str,
) -> None:
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    fill(log, range(2))
    dead = RegistryClient(dead_rpc_url, registry.address, timeout_s=1)
    anchorer = anchorer_for(log, dead, keys, interval_s=30)
    failed = anchors_total(AnchorOutcome.FAILED)
    with structlog.testing.capture_logs() as logs:
        assert anchorer.anchor_once() is AnchorOutcome.FAILED
    assert anchors_total(AnchorOutcome.FAILED) == failed + 1
    [warning] = [e for e in logs if e["event"] == "audit_anchor_failed"]
    assert warning["log_level"] == "warning" and "unavailable" in warning["error"]
    assert "some-api-key" not in str(warning)  # the adapter redacts the RPC URL
    assert not anchorer.due()  # backs off for interval_s
    # The same log, anchored through a live chain.
    assert anchorer_for(log, registry, keys).anchor_once() is AnchorOutcome.ANCHORED


def test_a_node_that_cannot_pay_is_retried_later(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
) -> None:
    register(registry, admin, keys, fund=False)
    log = open_log(keys, "audit")
    fill(log, range(2))
    anchorer = anchorer_for(log, registry, keys)
    assert anchorer.anchor_once() is AnchorOutcome.FAILED
    set_balance(registry.rpc_url, keys.eth_address(), FUNDING_WEI)
    assert anchorer.anchor_once() is AnchorOutcome.ANCHORED


class FlakyRegistry:
    """The real registry behind switches: ``down`` makes every call fail as an outage
    would; ``hung`` makes every call wait, as a chain that does not answer would, until
    ``released`` (then it fails). ``calls`` counts every call."""

    def __init__(self, registry: RegistryClient) -> None:
        self._registry = registry
        self.down = threading.Event()
        self.hung = threading.Event()
        self.released = threading.Event()
        self.calls = 0
        self.calls_while_down = 0

    def _check(self) -> None:
        self.calls += 1
        if self.hung.is_set():
            self.released.wait()
            raise ChainUnavailable("chain at http://127.0.0.1 unavailable (ReadTimeout)")
        if self.down.is_set():
            self.calls_while_down += 1
            raise ChainUnavailable("chain at http://127.0.0.1 unavailable (ConnectionError)")

    def latest_checkpoint(self, node_id: str) -> tuple[int, bytes, int] | None:
        self._check()
        return self._registry.latest_checkpoint(node_id)

    def anchor_checkpoint(self, node: TxSigner, **kwargs: Any) -> str:
        self._check()
        return self._registry.anchor_checkpoint(node, **kwargs)


def test_the_thread_survives_a_chain_outage(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    clock: FakeClock,
) -> None:
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    flaky = FlakyRegistry(registry)
    flaky.down.set()
    anchorer = anchorer_for(log, flaky, keys, every_entries=1, interval_s=INTERVAL_S, clock=clock)
    anchorer.start()
    try:
        fill(log, range(3))
        wait_for(lambda: flaky.calls_while_down == 1)  # the round at start-up
        clock.wait_for_reads(3)
        assert flaky.calls_while_down == 1  # backing off: no retry before interval_s
        clock.advance(INTERVAL_S)
        wait_for(lambda: flaky.calls_while_down == 2)  # retried once it has passed
        # The log keeps taking entries meanwhile: it does not depend on the chain.
        fill(log, range(3, 4))
        flaky.down.clear()
        clock.advance(INTERVAL_S)
        wait_for(lambda: registry.latest_checkpoint(NODE) is not None)
        assert latest_anchor(registry) == (4, log.root(4))
    finally:
        anchorer.stop()


# --- a graceful stop ---------------------------------------------------------------------


@pytest.fixture
def running(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
) -> Iterator[tuple[AuditLog, FlakyRegistry, Anchorer]]:
    """A started anchorer whose first round anchored one entry, and that no schedule would
    run again during a test."""
    register(registry, admin, keys)
    log = open_log(keys, "audit")
    fill(log, range(1))
    flaky = FlakyRegistry(registry)
    anchorer = anchorer_for(log, flaky, keys, every_entries=1000, interval_s=3600)
    anchorer.start()
    try:
        wait_for(lambda: anchorer.last_anchored is not None)
        yield log, flaky, anchorer
    finally:
        flaky.released.set()
        anchorer.stop()


def test_stop_anchors_the_entries_appended_since_the_last_anchor(
    registry: RegistryClient, running: tuple[AuditLog, FlakyRegistry, Anchorer]
) -> None:
    log, _, anchorer = running
    fill(log, range(1, 3))
    anchorer.stop()
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1, 3]
    assert latest_anchor(registry) == (3, log.root(3))


def test_stop_with_nothing_new_does_not_call_the_chain(
    registry: RegistryClient, running: tuple[AuditLog, FlakyRegistry, Anchorer]
) -> None:
    _, flaky, anchorer = running
    calls = flaky.calls
    anchorer.stop()
    assert flaky.calls == calls
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1]


def test_a_chain_that_is_down_at_stop_is_logged_not_raised(
    registry: RegistryClient, running: tuple[AuditLog, FlakyRegistry, Anchorer]
) -> None:
    log, flaky, anchorer = running
    fill(log, range(1, 3))
    flaky.down.set()
    failed = anchors_total(AnchorOutcome.FAILED)
    with structlog.testing.capture_logs() as logs:
        anchorer.stop()
    assert flaky.calls_while_down == 1
    assert anchors_total(AnchorOutcome.FAILED) == failed + 1
    assert [e["event"] for e in logs] == ["audit_anchor_failed"]
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1]


def test_a_chain_that_does_not_answer_at_stop_does_not_hold_shutdown(
    registry: RegistryClient, running: tuple[AuditLog, FlakyRegistry, Anchorer]
) -> None:
    log, flaky, anchorer = running
    fill(log, range(1, 3))
    flaky.hung.set()
    calls = flaky.calls
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        anchorer.stop(timeout_s=0.3)
    assert time.monotonic() - started < 2
    [warning] = [e for e in logs if e["event"] == "audit_anchorer_stop_timed_out"]
    assert warning["log_level"] == "warning" and warning["timeout_s"] == 0.3
    assert flaky.calls == calls + 1  # the last round, waiting on its first read
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [1]


def test_stop_after_a_divergence_anchors_nothing(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
) -> None:
    register(registry, admin, keys)
    original = open_log(keys, "audit")
    fill(original, range(4))
    assert anchorer_for(original, registry, keys).anchor_once() is AnchorOutcome.ANCHORED
    other = open_log(keys, "other")
    fill(other, range(6), "x")  # longer than the anchor, and another root at its size
    flaky = FlakyRegistry(registry)
    anchorer = anchorer_for(other, flaky, keys, every_entries=1000, interval_s=3600)
    anchorer.start()
    try:
        wait_for(lambda: anchorer.divergence is not None)
        fill(other, range(6, 8), "x")
        calls, refused = flaky.calls, anchors_total(AnchorOutcome.REFUSED)
    finally:
        anchorer.stop()
    assert flaky.calls == calls  # no last round at all
    assert anchors_total(AnchorOutcome.REFUSED) == refused
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [4]


# --- divergence --------------------------------------------------------------------------


def fill_rewritten(log: AuditLog) -> None:
    """Four entries, the third not the one anchored."""
    fill(log, range(2))
    fill(log, range(2, 3), "x")
    fill(log, range(3, 4))


@pytest.mark.parametrize(
    "restored",
    [
        pytest.param(lambda log: fill(log, range(2)), id="shorter"),
        pytest.param(fill_rewritten, id="rewritten"),
        pytest.param(lambda log: fill(log, range(6), "x"), id="rewritten-and-longer"),
    ],
)
def test_a_log_that_does_not_extend_the_anchor_is_reported_and_not_anchored(
    registry: RegistryClient,
    admin: LocalAccount,
    keys: MemoryKeyStore,
    open_log: Callable[[KeyStore, str], AuditLog],
    restored: Callable[[AuditLog], None],
    clock: FakeClock,
) -> None:
    register(registry, admin, keys)
    original = open_log(keys, "audit")
    fill(original, range(4))
    assert anchorer_for(original, registry, keys).anchor_once() is AnchorOutcome.ANCHORED

    # The node restarts on another log (an old backup, a rewritten file).
    other = open_log(keys, "other")
    restored(other)
    anchorer = anchorer_for(
        other, registry, keys, every_entries=1, interval_s=INTERVAL_S, clock=clock
    )
    refused = anchors_total(AnchorOutcome.REFUSED)
    with structlog.testing.capture_logs() as logs:
        anchorer.start()  # the comparison is the thread's first round
        try:
            wait_for(lambda: anchorer.divergence is not None, 5)
            clock.advance(INTERVAL_S)
            clock.wait_for_reads(3)  # looks at which more rounds would be due: none runs
        finally:
            anchorer.stop()
    [error] = [e for e in logs if e["event"] == "audit_log_diverges_from_anchor"]
    assert error["log_level"] == "error" and error["anchored_size"] == 4
    assert anchorer.divergence is not None and anchorer.divergence.local_size == other.size()
    assert metrics.REGISTRY.get_sample_value("kms_node_audit_log_diverges_from_anchor") == 1
    assert anchors_total(AnchorOutcome.REFUSED) == refused + 1
    assert [a.tree_size for a in registry.checkpoint_anchors(NODE)] == [4]  # no fork anchored
    assert not anchorer.due()

    # The original log still extends the anchor: the check passes and clears the gauge.
    fill(original, range(4, 5))
    assert anchorer_for(original, registry, keys).anchor_once() is AnchorOutcome.ANCHORED
    assert metrics.REGISTRY.get_sample_value("kms_node_audit_log_diverges_from_anchor") == 0
