"""Checking a node's capsule fragment before it counts toward the threshold.

The coordinator holds no keys; it checks each cfrag against the patient's
registered keys (the kfrag-verifying key and her Umbral key for the record's type)
and the grantee's key, as the grantee will, so that a broken or lying node cannot
make the grantee's decryption fail.
"""

from __future__ import annotations

from core.errors import InvalidRequest
from core.registry_types import PatientInfo
from core.requests import ReencryptionQuery
from core.umbral_codec import VerificationError, load_cfrag, load_public_key


class CfragVerifier:
    """Checks cfrags for one capsule against the patient's keys and the grantee's."""

    def __init__(self, query: ReencryptionQuery, patient: PatientInfo) -> None:
        self._capsule = query.capsule
        self._receiving_key = query.receiving_key
        self._verifying_key = load_public_key(patient.verifying_key, "patient verifying key")
        self._delegating_key = load_public_key(
            patient.umbral_key(query.record_type), "patient umbral key"
        )

    def check(self, cfrag: bytes) -> bool:
        try:
            load_cfrag(cfrag).verify(
                self._capsule, self._verifying_key, self._delegating_key, self._receiving_key
            )
        except (InvalidRequest, VerificationError):
            return False
        return True
