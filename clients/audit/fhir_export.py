"""The audit's entries as FHIR R4B AuditEvent resources, in one ``collection`` Bundle, for a
hospital's security tooling (``kmsctl audit export --format fhir``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, Final

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from core.audit import GRANTED, AuditEntry
from core.audit_findings import NodeReport
from core.did import did_of
from core.errors import KmsError
from core.formats import hex_0x, iso_utc
from core.policy import Reason
from core.requests import PURPOSES_OF_USE

# FHIR code systems (R4B terminology).
DICOM: Final = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
#: an identifier whose value is itself a URI: here a party's DID, did:pkh:eip155:CHAIN:ADDRESS
URI_IDENTIFIER: Final = "urn:ietf:rfc:3986"
MEDKMS_EVENT: Final = "urn:medkms:audit-event"
MEDKMS_RECORD: Final = "urn:medkms:record-id"
MEDKMS_CAPSULE: Final = "urn:medkms:capsule-sha256"
MEDKMS_NODE: Final = "urn:medkms:node-id"
_ID_NAMESPACE: Final = uuid.UUID("6f1c1a52-2f35-5d0c-9d55-6d65646b6d73")

#: refusals by the access policy or for want of a kfrag: the request was wrong, the node was
#: not (AuditEvent outcome 4, "minor failure"); any other code is 8, "serious failure"
_MINOR_DENIALS: Final = frozenset(Reason) - {Reason.GRANTED}


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _account(chain_id: int, address: str) -> dict[str, Any]:
    """A party (requester or patient) named by its DID, as ``kmsctl`` names it."""
    return {"identifier": {"system": URI_IDENTIFIER, "value": did_of(chain_id, address)}}


def audit_event(node_id: str, leaf_index: int, entry: AuditEntry, chain_id: int) -> dict[str, Any]:
    """One decision as a FHIR R4B AuditEvent: a patient record's key was (or was not)
    released to the requester by re-encrypting its capsule."""
    purpose = [
        {
            "coding": [
                _coding(
                    ACT_REASON,
                    entry.purpose_of_use,
                    PURPOSES_OF_USE.get(entry.purpose_of_use, entry.purpose_of_use),
                )
            ]
        }
    ]
    if entry.decision == GRANTED:
        outcome = "0"
    else:
        outcome = "4" if entry.reason_code in _MINOR_DENIALS else "8"
    details = [
        ("request_id", entry.request_id),
        ("decision", entry.decision),
        ("reason_code", entry.reason_code),
        ("block_number", str(entry.block_number)),
        ("block_hash", hex_0x(entry.block_hash)),
        ("audit_leaf_index", str(leaf_index)),
    ]
    if entry.cfrag_hash:
        details.append(("cfrag_sha256", hex_0x(entry.cfrag_hash)))
    resource_id = uuid.uuid5(_ID_NAMESPACE, f"{node_id}/{leaf_index}/{entry.leaf_hash().hex()}")
    return {
        "resourceType": "AuditEvent",
        "id": str(resource_id),
        "type": _coding(DICOM, "110110", "Patient Record"),
        "subtype": [
            _coding(
                MEDKMS_EVENT,
                "reencrypt",
                "capsule re-encryption: a key fragment released to the requester",
            )
        ],
        "action": "E",
        "recorded": iso_utc(entry.time),
        "outcome": outcome,
        "outcomeDesc": entry.reason,
        "purposeOfEvent": purpose,
        "agent": [
            {
                "who": _account(chain_id, entry.requester),
                "requestor": True,
                "purposeOfUse": purpose,
            }
        ],
        "source": {
            "site": "medkms",
            "observer": {
                "identifier": {"system": MEDKMS_NODE, "value": node_id},
                "display": node_id,
            },
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": [
            {
                "what": _account(chain_id, entry.patient),
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            },
            {
                "what": {"identifier": {"system": MEDKMS_RECORD, "value": hex_0x(entry.record_id)}},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                "detail": [{"type": k, "valueString": v} for k, v in details],
            },
            {
                "what": {
                    "identifier": {"system": MEDKMS_CAPSULE, "value": hex_0x(entry.capsule_hash)}
                },
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "description": "SHA-256 of the Umbral capsule of the record's data key",
            },
        ],
    }


def fhir_bundle(nodes: Sequence[NodeReport], chain_id: int, *, now: int) -> str:
    """A FHIR R4B ``collection`` Bundle of one AuditEvent per entry of ``nodes``, validated
    against the R4B models."""
    entries = []
    for node in nodes:
        for result in node.entries:
            if result.entry is None:
                continue
            event = audit_event(node.node_id, result.leaf_index, result.entry, chain_id)
            entries.append({"fullUrl": f"urn:uuid:{event['id']}", "resource": event})
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": iso_utc(now),
        "entry": entries,
    }
    try:
        get_fhir_model_class("Bundle").model_validate(bundle)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KmsError(f"the FHIR export does not validate: {where}: {first['msg']}") from None
    return json.dumps(bundle, indent=2) + "\n"
