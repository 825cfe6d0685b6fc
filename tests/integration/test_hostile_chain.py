"""A real node process whose chain endpoint turns hostile: a proxy in front of the cluster's
anvil (tests/hostile_rpc.py) answers with deeply nested JSON, a huge body, wrong types or a
trickle. The node stays alive, refuses with UNAVAILABLE, logs why, and serves again once
the endpoint behaves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.sdk.records import parse_envelope
from core.record_types import RecordType
from deploy import processes
from deploy.local_cluster import LocalCluster, NodeEntry
from kms_node.kfrag_store import KfragStore
from proto.kms.v1 import common_pb2
from proto.stubs import NodeStub
from tests.hostile_rpc import HostileRpc, Reply, huge, nested, result, slow, trickle
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


@dataclass
class HostileChainNode:
    """The cluster's last node, restarted with its chain endpoint behind ``rpc``."""

    cluster: LocalCluster
    node: NodeEntry
    rpc: HostileRpc
    process: subprocess.Popen[bytes]
    log: Path

    def events(self, name: str) -> list[dict[str, object]]:
        lines = self.log.read_text(errors="replace").splitlines()
        parsed = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in parsed if e.get("event") == name]

    def reencrypt(self, request: common_pb2.ReencryptionRequest) -> str:
        """OK, or the refusal's status and details."""
        with self.cluster.transport.channel(
            self.node.address, server_name=self.node.node_id
        ) as channel:
            try:
                NodeStub(channel).Reencrypt(request, timeout=15)
            except grpc.RpcError as e:
                assert isinstance(e, grpc.Call)
                return f"{e.code().name}: {e.details()}"
        return "OK"


@pytest.fixture
def hostile(cluster: LocalCluster) -> Iterator[HostileChainNode]:
    node = cluster.nodes[-1]
    rpc = HostileRpc(upstream=cluster.rpc_url)
    config = Path(node.config).with_name("hostile-chain.toml")
    text = Path(node.config).read_text()
    config.write_text(
        re.sub(r"(?m)^chain_rpc_url = .*$", f"chain_rpc_url = {json.dumps(rpc.url)}", text)
    )
    cluster.stop_node(node.node_id)
    # Among the cluster's logs, so that the session's final scan for secrets reads it too.
    log = cluster.state_dir / "logs" / f"{node.node_id}-hostile-chain.log"
    process = processes.spawn(
        [sys.executable, "-m", "cli.node", "serve", "--config", str(config)], log
    )
    try:
        processes.wait_until(
            node.node_id,
            lambda: processes.grpc_serving(
                node.address, cluster.transport, server_name=node.node_id
            ),
            process,
            log,
        )
        yield HostileChainNode(cluster, node, rpc, process, log)
    finally:
        process.terminate()
        process.wait(15)
        rpc.close()
        config.unlink()
        cluster.start_node(node.node_id)


def _until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


HOSTILE: dict[str, tuple[Reply | None, tuple[str, ...], str]] = {
    # reply (None: huge, made with the proxy), methods (all if empty), reason logged
    "nested": (nested(200_000), (), "JSON-RPC answer nests deeper than 32 levels"),
    "huge": (None, (), "answer larger than 8388608 bytes"),
    "wrong-type": (result("0x1"), ("eth_getBlockByNumber",), "answered malformed data"),
    "trickling": (trickle(0.5), (), "no complete answer within 10s"),
}


def test_a_node_whose_chain_lies_stays_up_refuses_and_logs_why(
    people: People, hostile: HostileChainNode
) -> None:
    people.grant_doctor([RecordType.LAB_RESULT])
    capsule = bytes(parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule)
    signer = people.doctor_signer()

    def request() -> common_pb2.ReencryptionRequest:
        return signer.single(
            people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
        )

    assert hostile.reencrypt(request()) == "OK"
    for name, (reply, methods, reason) in HOSTILE.items():
        hostile.rpc.misbehave(reply or huge(hostile.rpc, declared=False), *methods)
        # The index goes stale (2 s) or the chain read behind the answer fails: UNAVAILABLE.
        answers: list[str] = []

        def refused(answers: list[str] = answers) -> bool:
            answers.append(hostile.reencrypt(request()))
            return answers[-1] != "OK"

        def logged(reason: str = reason) -> bool:
            return any(reason in str(e["error"]) for e in hostile.events("chain_sync_failed"))

        _until(refused, f"{name}: a refusal")
        assert answers[-1].startswith("UNAVAILABLE: "), (name, answers[-1])
        _until(logged, f"{name}: the reason in the node's log")
        assert hostile.process.poll() is None, f"{name}: the node died"
        # Once the index is stale the refusal says so, and why (a refusal by the index is
        # confirmed against the chain: until then, that read's failure is the reason given).
        stale: list[str] = []

        def judged_stale(stale: list[str] = stale) -> bool:
            stale.append(hostile.reencrypt(request()))
            return stale[-1].startswith("UNAVAILABLE: cannot judge grants on stale chain state")

        _until(judged_stale, f"{name}: a refusal for stale chain state")
        assert reason in stale[-1], stale[-1]
        assert all(answer.startswith("UNAVAILABLE: ") for answer in stale), stale
        hostile.rpc.behave()
        _until(lambda: hostile.reencrypt(request()) == "OK", f"{name}: serving again")
    assert hostile.process.poll() is None
    # The anchoring worker met the same answers and survived them as failed rounds.
    assert not hostile.events("audit_anchor_crashed")
    assert not hostile.events("chain_sync_crashed")


def test_a_revocation_met_while_the_chain_cannot_be_read_is_shredded_once_it_can(
    people: People, hostile: HostileChainNode
) -> None:
    """The follower indexes the revocation but the shredding's chain read (which grants
    still cover the kfrags) fails: the read is refused at once, the kfrag waits, and it is
    shredded at a later sync once the endpoint answers again."""
    people.grant_doctor([RecordType.LAB_RESULT])
    alice, bob = people.patient.identity.address, people.doctor.address
    capsule = bytes(parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule)
    signer = people.doctor_signer()

    def request() -> common_pb2.ReencryptionRequest:
        return signer.single(alice, people.lab.record_id, RecordType.LAB_RESULT, capsule)

    store = KfragStore(Path(hostile.node.config).parent / "kfrags.sqlite")
    try:
        assert hostile.reencrypt(request()) == "OK"
        hostile.rpc.misbehave(result("0x1"), "eth_call")
        failed = len(hostile.events("chain_sync_failed"))  # the log is the fixture's
        people.patient.revoke(bob)
        _until(lambda: len(hostile.events("chain_sync_failed")) > failed, "the shredding's failure")
        assert hostile.reencrypt(request()) != "OK"
        assert store.get(alice, bob, RecordType.LAB_RESULT) is not None  # not shredded yet
        hostile.rpc.behave()
        _until(lambda: store.get(alice, bob, RecordType.LAB_RESULT) is None, "the shredding")
        assert hostile.reencrypt(request()).startswith("PERMISSION_DENIED: ")
    finally:
        store.close()


def test_a_chain_read_that_hangs_holds_up_no_read_the_index_can_judge(
    people: People, hostile: HostileChainNode
) -> None:
    """ADR 17: a read whose judgement needs the chain (here, a record the index does not
    know) waits for it in the node's pool, never in the loop that serves the others. The
    endpoint hangs on that read's eth_call; a read the index judges is served meanwhile."""
    people.grant_doctor([RecordType.LAB_RESULT])
    capsule = bytes(parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule)
    signer = people.doctor_signer()
    patient = people.patient.identity.address

    def request(record_id: bytes) -> common_pb2.ReencryptionRequest:
        return signer.single(patient, record_id, RecordType.LAB_RESULT, capsule)

    assert hostile.reencrypt(request(people.lab.record_id)) == "OK"
    hostile.rpc.misbehave(slow(8), "eth_call")  # then hangs up without an answer
    calls = hostile.rpc.methods.count("eth_call")
    with ThreadPoolExecutor(max_workers=1) as caller:
        stuck = caller.submit(hostile.reencrypt, request(bytes(range(32))))
        _until(lambda: hostile.rpc.methods.count("eth_call") > calls, "the chain read")
        assert hostile.reencrypt(request(people.lab.record_id)) == "OK"
        assert not stuck.done()
        assert stuck.result(timeout=30).startswith("UNAVAILABLE: ")
    hostile.rpc.behave()
    assert hostile.process.poll() is None
