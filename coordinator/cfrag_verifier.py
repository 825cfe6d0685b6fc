"""Checking a node's capsule fragment before it counts toward the threshold.

The coordinator holds no keys; it checks a cfrag against the patient's registered
keys (the kfrag-verifying key and her Umbral key for the record's type) and the
grantee's key, as the grantee will. It does so for every fragment only when configured
to (``verify_every_fragment``); otherwise for the fragments an app reports and those of
nodes suspected of lying (ADR 14). Keys are loaded on the first check.
"""

from __future__ import annotations

from functools import cached_property

import umbral_pre as umbral

from core.errors import InvalidRequest
from core.registry_types import PatientInfo
from core.requests import ReencryptionQuery
from core.umbral_codec import VerificationError, load_cfrag, load_public_key


class CfragVerifier:
    """Checks cfrags for one capsule against the patient's keys and the grantee's."""

    def __init__(self, query: ReencryptionQuery, patient: PatientInfo) -> None:
        self._query = query
        self._patient = patient

    @cached_property
    def _keys(self) -> tuple[umbral.PublicKey, umbral.PublicKey]:
        """The patient's verifying key and her Umbral key for the record's type."""
        umbral_key = self._patient.umbral_key(self._query.record_type)
        return (
            load_public_key(self._patient.verifying_key, "patient verifying key"),
            load_public_key(umbral_key, "patient umbral key"),
        )

    def check(self, cfrag: bytes) -> bool:
        verifying_key, delegating_key = self._keys
        try:
            load_cfrag(cfrag).verify(
                self._query.capsule, verifying_key, delegating_key, self._query.receiving_key
            )
        except (InvalidRequest, VerificationError):
            return False
        return True
