"""The audit's entries as FHIR R4B AuditEvents."""

from __future__ import annotations

import dataclasses

from fhir.resources.R4B.bundle import Bundle

from clients.audit.fhir_export import fhir_bundle
from tests.clients.test_audit_report import cluster_report
from tests.core.test_audit_verify import DOCTOR, NODE, T0, Node, make_entry
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)

CHAIN_ID = 31337


def test_fhir_export_is_a_valid_r4b_bundle_of_audit_events(node: Node) -> None:
    bundle = fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)
    parsed = Bundle.model_validate_json(bundle)
    assert parsed.type == "collection" and len(parsed.entry) == 40
    granted, denied = parsed.entry[0].resource, parsed.entry[4].resource
    assert granted.get_resource_type() == "AuditEvent"
    assert (granted.action, granted.outcome, denied.outcome) == ("E", "0", "4")
    assert granted.type.code == "110110" and granted.subtype[0].code == "reencrypt"
    assert granted.recorded.isoformat() == "2027-01-15T08:00:00+00:00"
    assert granted.purposeOfEvent[0].coding[0].code == "TREAT"
    assert granted.agent[0].who.identifier.value == f"eip155:{CHAIN_ID}:{DOCTOR}"
    assert granted.agent[0].requestor is True
    assert granted.source.observer.display == NODE
    patient, record, capsule = granted.entity
    assert patient.role.code == "1" and record.what.identifier.value.startswith("0x0001")
    assert {d.type: d.valueString for d in record.detail}["request_id"] == "req-0"
    assert capsule.what.identifier.system == "urn:medkms:capsule-sha256"
    # Stable ids: exporting twice gives the same resources.
    assert bundle == fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)


def test_an_unknown_denial_reason_is_a_serious_failure(node: Node) -> None:
    odd = dataclasses.replace(
        make_entry(44), reason_code="hsm_failed", reason="the HSM failed"
    )  # entry 44 is a denial
    node.append([make_entry(i) for i in range(40, 44)] + [odd])
    bundle = Bundle.model_validate_json(fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0))
    assert bundle.entry[44].resource.outcome == "8"
