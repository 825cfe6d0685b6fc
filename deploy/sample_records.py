"""Sample FHIR R4 records, for the demo scenario, the tests and the benchmarks."""

from __future__ import annotations

import json


def lab_result() -> bytes:
    """A FHIR R4 Observation: an HbA1c result."""
    return json.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}],
                "text": "Hemoglobin A1c",
            },
            "subject": {"reference": "Patient/alice"},
            "effectiveDateTime": "2026-11-20T09:30:00Z",
            "valueQuantity": {
                "value": 6.1,
                "unit": "%",
                "system": "http://unitsofmeasure.org",
                "code": "%",
            },
        },
        indent=2,
    ).encode()


def diagnosis() -> bytes:
    """A FHIR R4 Condition: type 2 diabetes."""
    return json.dumps(
        {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "code": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}
                ]
            },
            "subject": {"reference": "Patient/alice"},
        }
    ).encode()
