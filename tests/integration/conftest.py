"""The real local cluster (anvil + registry, five SoftHSM-backed nodes, the
coordinator, gRPC over TCP), started once for the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient, RecordRead
from clients.sdk.signed_requests import RequestSigner
from contracts.registry import RegistryClient
from core.record_types import RecordType
from deploy.anvil import set_balance
from deploy.local_cluster import FUNDING_WEI, LocalCluster
from deploy.sample_records import diagnosis, lab_result
from proto.kms.v1 import common_pb2
from proto.stubs import CoordinatorStub, NodeStub

#: every identity the session created, so the final log scan knows what to look for
CREATED_IDENTITIES: list[Identity] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``runs_last`` run after every other test of the session."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def block_time_s() -> int | None:
    """anvil's block time for the session's cluster: ``MEDKMS_TEST_BLOCK_TIME`` seconds
    (``make test-block-times``), else a block per transaction at once."""
    value = os.environ.get("MEDKMS_TEST_BLOCK_TIME", "")
    if not value:
        return None
    if not value.isdigit():
        raise pytest.UsageError(f"MEDKMS_TEST_BLOCK_TIME must be whole seconds, not {value!r}")
    return int(value)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state_dir: Path = tmp_path_factory.mktemp("cluster")
    cluster = LocalCluster.up(state_dir, nodes=5, threshold=3, block_time_s=block_time_s())
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def registry(cluster: LocalCluster) -> RegistryClient:
    return cluster.registry()


@pytest.fixture(scope="session")
def coordinator(cluster: LocalCluster) -> Iterator[CoordinatorStub]:
    """The app-facing coordinator, over one channel shared by the session."""
    with cluster.coordinator_channel() as channel:
        yield CoordinatorStub(channel)


@dataclass
class People:
    """A fresh patient with two records and a fresh provider, for one test."""

    cluster: LocalCluster
    registry: RegistryClient
    patient: PatientClient
    doctor: Identity
    lab: StoredRecord
    condition: StoredRecord

    def new_identity(
        self, name: str, *, provider: bool = False, emergency: bool = False
    ) -> Identity:
        identity = Identity.generate(name)
        CREATED_IDENTITIES.append(identity)
        set_balance(self.cluster.rpc_url, identity.address, FUNDING_WEI)
        admin = self.cluster.identity("admin")
        if provider:
            self.registry.grant_provider_role(admin.account, identity.address)
        if emergency:
            self.registry.grant_emergency_role(admin.account, identity.address)
        return identity

    def grant_doctor(self, types: list[RecordType] | None = None, duration_s: int = 3600) -> None:
        self.patient.grant(
            self.doctor.address,
            self.doctor.umbral_public_key(),
            types or [RecordType.LAB_RESULT],
            duration_s=duration_s,
            threshold=self.cluster.threshold,
        )

    def granted_doctor(self, name: str) -> Identity:
        """Another provider, granted the patient's lab results."""
        doctor = self.new_identity(name, provider=True)
        self.patient.grant(
            doctor.address,
            doctor.umbral_public_key(),
            [RecordType.LAB_RESULT],
            duration_s=3600,
            threshold=self.cluster.threshold,
        )
        return doctor

    def read_at_once(
        self, doctors: list[Identity], rounds: int, coordinator_address: str | None = None
    ) -> list[RecordRead | Exception]:
        """Each doctor, in a thread of its own, reads the lab record ``rounds`` times,
        all starting together: what every read returned, or raised."""
        start = threading.Barrier(len(doctors))

        def reads(doctor: Identity) -> list[RecordRead | Exception]:
            with ProviderClient(
                doctor,
                registry=self.registry,
                blobs=self.cluster.blob_store(),
                coordinator_address=coordinator_address or self.cluster.coordinator_address,
                transport=self.cluster.app_transport,
            ) as app:
                start.wait(timeout=30)
                results: list[RecordRead | Exception] = []
                for _ in range(rounds):
                    try:
                        results.append(app.read_record_with_receipts(self.lab.record_id))
                    except Exception as e:  # noqa: BLE001 - the test reports it
                        results.append(e)
                return results

        with futures.ThreadPoolExecutor(len(doctors)) as pool:
            return [r for rs in pool.map(reads, doctors) for r in rs]

    def doctor_signer(self) -> RequestSigner:
        """Signs requests as the test's doctor, the way the SDK does."""
        return RequestSigner(
            self.doctor.account, self.doctor.umbral_public_key(), self.registry.signing_domain()
        )

    def every_node_refuses(self, request: common_pb2.ReencryptionRequest, reason: str) -> None:
        """Each node, asked directly, refuses ``request`` as PERMISSION_DENIED, saying
        ``reason``."""
        for node in self.cluster.nodes:
            with self.cluster.transport.channel(node.address) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    NodeStub(channel).Reencrypt(request, timeout=5)
            assert isinstance(caught.value, grpc.Call)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, node.node_id
            assert reason in (caught.value.details() or ""), node.node_id

    def provider(self, identity: Identity | None = None) -> ProviderClient:
        return ProviderClient(
            identity or self.doctor,
            registry=self.registry,
            blobs=self.cluster.blob_store(),
            coordinator_address=self.cluster.coordinator_address,
            transport=self.cluster.app_transport,
        )


@pytest.fixture
def people(cluster: LocalCluster, registry: RegistryClient) -> Iterator[People]:
    blank = People(cluster, registry, None, None, None, None)  # type: ignore[arg-type]
    alice = blank.new_identity("alice")
    with PatientClient(
        alice,
        registry=registry,
        blobs=cluster.blob_store(),
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
    ) as patient:
        patient.register()
        lab = patient.store_record(lab_result(), RecordType.LAB_RESULT)
        condition = patient.store_record(diagnosis(), RecordType.DIAGNOSIS)
        doctor = blank.new_identity("dr-bob", provider=True)
        yield People(cluster, registry, patient, doctor, lab, condition)


#: appends one entry to a stopped node's audit log with the node's own HSM key, as an
#: operator with the node's PIN could (argv: the node's config, the entry's fields as JSON)
_FORGE = """
import json, sys
from pathlib import Path
from core.audit import AuditEntry
from kms_node.audit_log import AuditLog
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.settings import NodeSettings

settings = NodeSettings.from_toml(Path(sys.argv[1]))
fields = json.loads(sys.argv[2])
for name in ("record_id", "capsule_hash", "block_hash", "cfrag_hash"):
    fields[name] = bytes.fromhex(fields[name])
keys = Pkcs11KeyStore.open(
    settings.hsm_module, settings.hsm_token_label, settings.user_pin(),
    softhsm_conf=settings.softhsm_conf,
)
log = AuditLog(settings.audit_db, keys, settings.node_id)
print(log.append(AuditEntry(**fields)).leaf_index)
log.close()
keys.close()
"""


def append_forged_entry(cluster: LocalCluster, node_id: str, fields: dict[str, object]) -> int:
    """Stop the node, append an entry of ``fields`` (bytes as hex) signed with its own key,
    start it again; the entry's leaf index."""
    cluster.stop_node(node_id)
    appended = subprocess.run(
        [sys.executable, "-c", _FORGE, cluster.node(node_id).config, json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert appended.returncode == 0, appended.stderr
    cluster.start_node(node_id)
    return int(appended.stdout)


def core_file_limit(pid: int) -> list[str]:
    """Process ``pid``'s soft and hard core file size limits, as ``/proc`` shows them."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    (core,) = [line for line in limits if line.startswith("Max core file size")]
    return core.split()[4:6]
