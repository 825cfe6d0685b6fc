"""The patient -> doctor scenario, run against a running local cluster.

Every step checks what it expects; the demo fails (non-zero exit from
``kmsctl demo``) if the cluster does anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from clients.audit.audit_report import failures
from clients.audit.auditor import audit_cluster, channel_factory
from clients.sdk.patient import PatientClient
from clients.sdk.provider import ProviderClient
from clients.sdk.records import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH
from core import bounded_json
from core.errors import AccessDenied, KmsError
from core.record_types import RecordType
from deploy.local_cluster import LocalCluster
from deploy.sample_records import diagnosis, lab_result


class DemoFailed(KmsError):
    """The cluster did not behave as the scenario expects."""


def run(cluster: LocalCluster, say: Callable[[str], None] = print) -> None:
    registry = cluster.registry()
    blobs = cluster.blob_store()
    alice = cluster.identity("patient")
    bob = cluster.identity("doctor")
    patient = PatientClient(
        alice,
        registry=registry,
        blobs=blobs,
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
    )
    nodes = cluster.nodes
    say(f"cluster: {len(nodes)} nodes, threshold {cluster.threshold}, registry {registry.address}")
    chain_id = registry.chain_id()
    say(f"patient {alice.did(chain_id)}, doctor {bob.did(chain_id)}")

    say("1. patient registers her Umbral keys (one per record type) and kfrag-verifying key")
    patient.register()

    say("2. patient stores a lab result (FHIR Observation, HbA1c) and a diagnosis")
    document = lab_result()
    lab = patient.store_record(document, RecordType.LAB_RESULT)
    condition = patient.store_record(diagnosis(), RecordType.DIAGNOSIS)
    say(f"   lab result 0x{lab.record_id.hex()[:16]}... stored as {lab.storage_uri[:24]}...")
    say(f"   content hash {lab.content_hash.hex()[:16]}... anchored in the registry")

    say("3. patient grants the doctor access to lab results for one hour")
    outcome = patient.grant(
        bob.address,
        bob.umbral_public_key(),
        [RecordType.LAB_RESULT],
        duration_s=3600,
        threshold=cluster.threshold,
    )
    enrolled = ", ".join(sorted(outcome.enrolled))
    say(
        f"   kfrags sealed to each node's HSM key, relayed by the coordinator, "
        f"stored at {len(outcome.enrolled)} nodes: {enrolled}"
    )

    with ProviderClient(
        bob,
        registry=registry,
        blobs=blobs,
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
    ) as doctor:
        say("4. doctor reads the lab result through the coordinator")
        plaintext = doctor.read_record(lab.record_id)
        if plaintext != document:
            raise DemoFailed("decrypted record differs from the original")
        value = bounded_json.loads_object(
            plaintext, max_bytes=MAX_DOCUMENT_BYTES, max_depth=MAX_DOCUMENT_DEPTH, what="record"
        )["valueQuantity"]
        say(f"   decrypted record equals the original (HbA1c {value['value']}{value['unit']})")

        say("5. doctor asks for the diagnosis, which the grant does not cover")
        _expect_refusal(lambda: doctor.read_record(condition.record_id), say)

        say("6. patient revokes the grant on-chain")
        block = patient.revoke(bob.address)
        waited = patient.await_nodes(block)
        say(
            f"   mined in block {block}; in force at every node (as the coordinator reports) "
            f"{waited * 1000:.0f} ms later"
        )

        say("7. doctor asks for the lab result again")
        _expect_refusal(lambda: doctor.read_record(lab.record_id), say)

    responder = cluster.identity("responder")
    say("8. patient opts in to emergency access to her lab results by the emergency department")
    patient.opt_in_emergency(
        responder.address,
        responder.umbral_public_key(),
        [RecordType.LAB_RESULT],
        threshold=cluster.threshold,
    )
    with ProviderClient(
        responder,
        registry=registry,
        blobs=blobs,
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
    ) as er:
        say("9. the emergency department opens a 15-minute emergency grant and reads (ETREAT)")
        block, expires_at = er.open_emergency_access(alice.address, 15 * 60)
        patient.await_nodes(block)
        if er.read_record(lab.record_id, "ETREAT") != document:
            raise DemoFailed("emergency read differs from the original")
        until = datetime.fromtimestamp(expires_at, UTC).strftime("%H:%M:%S UTC")
        say(f"   read under the emergency grant; it expires by itself at {until} (chain time)")
    patient.close()

    say("10. an auditor checks every node's log against the chain")
    report = audit_cluster(registry, channel_factory(cluster.transport))
    if not report.ok:
        raise DemoFailed(f"the audit failed: {failures(report)}")
    decisions = sum(n.granted + n.denied for n in report.nodes)
    say(
        f"   {decisions} decisions at {len(report.nodes)} nodes: checkpoints, entries and "
        "anchors verify with the keys registered on-chain, and every decision is judged "
        "again at its block"
    )
    say("demo finished: every step behaved as expected")


def _expect_refusal(attempt: Callable[[], bytes], say: Callable[[str], None]) -> None:
    try:
        attempt()
    except AccessDenied as e:
        say(f"   refused (PERMISSION_DENIED): {e.message}")
        return
    raise DemoFailed("the request was served but should have been refused")
