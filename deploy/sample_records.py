"""Sample FHIR R4 records, for the demo scenario, the tests and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

#: the example record a new operator stores by hand (README "Running across hosts")
LAB_RESULT_EXAMPLE: Final = Path(__file__).resolve().parent / "examples" / "observation-hba1c.json"


def lab_result() -> bytes:
    """A FHIR R4 Observation: an HbA1c result (the README's example record)."""
    return LAB_RESULT_EXAMPLE.read_bytes()


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
