"""Record types, their FHIR resources, and the bitmask the registry stores.

The registry holds a grant's allowed types as a uint32 bitmask with bit
``RecordType.value`` set per allowed type; the order here is the contract's.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from core.errors import InvalidRequest


class RecordType(IntEnum):
    DIAGNOSIS = 0
    LAB_RESULT = 1
    PRESCRIPTION = 2
    IMAGING = 3
    VACCINATION = 4
    SURGERY = 5

    @property
    def label(self) -> str:
        """Lower-case name used on the wire and in envelopes, e.g. ``lab_result``."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> RecordType:
        try:
            return cls[name.strip().upper().replace("-", "_")]
        except KeyError:
            known = ", ".join(t.label for t in cls)
            raise InvalidRequest(
                f"unknown record type {name!r}; expected one of: {known}"
            ) from None


# FHIR R4 resource types that may carry each record type.
FHIR_RESOURCES: dict[RecordType, frozenset[str]] = {
    RecordType.DIAGNOSIS: frozenset({"Condition"}),
    RecordType.LAB_RESULT: frozenset({"Observation", "DiagnosticReport"}),
    RecordType.PRESCRIPTION: frozenset({"MedicationRequest"}),
    RecordType.IMAGING: frozenset({"ImagingStudy"}),
    RecordType.VACCINATION: frozenset({"Immunization"}),
    RecordType.SURGERY: frozenset({"Procedure"}),
}

ALL_TYPES_MASK = (1 << len(RecordType)) - 1


def to_mask(types: Iterable[RecordType]) -> int:
    mask = 0
    for t in types:
        mask |= 1 << int(t)
    return mask


def from_mask(mask: int) -> frozenset[RecordType]:
    return frozenset(t for t in RecordType if mask & (1 << int(t)))
