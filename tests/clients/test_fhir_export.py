"""The audit's entries as FHIR R4B AuditEvents."""

from __future__ import annotations

import dataclasses

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from clients.audit.fhir_export import fhir_bundle
from core.did import parse_did
from tests.clients.test_audit_report import cluster_report
from tests.core.test_audit_verify import DOCTOR, NODE, T0, Node, make_entry
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)

CHAIN_ID = 31337


def test_fhir_export_is_a_valid_r4b_bundle_of_audit_events(node: Node) -> None:
    bundle = fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)
    parsed = Bundle.model_validate_json(bundle)
    assert parsed.type == "collection" and parsed.entry is not None and len(parsed.entry) == 40
    granted, denied = parsed.entry[0].resource, parsed.entry[4].resource
    assert isinstance(granted, AuditEvent) and isinstance(denied, AuditEvent)
    assert granted.get_resource_type() == "AuditEvent"
    assert (granted.action, granted.outcome, denied.outcome) == ("E", "0", "4")
    # FHIR's optional fields are None-able in the model: each is narrowed before it is read.
    assert granted.subtype and granted.recorded and granted.purposeOfEvent and granted.entity
    assert granted.type.code == "110110" and granted.subtype[0].code == "reencrypt"
    assert granted.recorded.isoformat() == "2027-01-15T08:00:00+00:00"
    assert granted.purposeOfEvent[0].coding and granted.purposeOfEvent[0].coding[0].code == "TREAT"
    agent = granted.agent[0]
    assert agent.who and agent.who.identifier
    assert agent.who.identifier.system == "urn:ietf:rfc:3986"
    assert agent.who.identifier.value == f"did:pkh:eip155:{CHAIN_ID}:{DOCTOR}"
    assert agent.requestor is True
    assert granted.source.observer.display == NODE
    patient, record, capsule = granted.entity
    assert patient.role and patient.role.code == "1"
    assert patient.what and patient.what.identifier and patient.what.identifier.value
    assert parse_did(patient.what.identifier.value).chain_id == CHAIN_ID
    assert record.what and record.what.identifier and record.what.identifier.value
    assert record.what.identifier.value.startswith("0x0001") and record.detail
    assert {d.type: d.valueString for d in record.detail}["request_id"] == "req-0"
    assert capsule.what and capsule.what.identifier
    assert capsule.what.identifier.system == "urn:medkms:capsule-sha256"
    # Stable ids: exporting twice gives the same resources.
    assert bundle == fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)


def test_an_unknown_denial_reason_is_a_serious_failure(node: Node) -> None:
    odd = dataclasses.replace(
        make_entry(44), reason_code="hsm_failed", reason="the HSM failed"
    )  # entry 44 is a denial
    node.append([make_entry(i) for i in range(40, 44)] + [odd])
    bundle = Bundle.model_validate_json(fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0))
    assert bundle.entry is not None
    denial = bundle.entry[44].resource
    assert isinstance(denial, AuditEvent) and denial.outcome == "8"
