"""Building signed re-encryption requests (EIP-712), as the grantee's app sends them.

The one place where the wire messages and the typed data a wallet signs are put
together, so that what is signed is exactly what is sent.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence

from eth_account.signers.local import LocalAccount

from medkms.core.request_auth import BatchClaims, Domain, RequestClaims, sign
from medkms.core.requests import address_bytes
from medkms.core.umbral_codec import capsule_hash
from medkms.proto.kms.v1 import common_pb2

#: how long a signed request stays valid; nodes accept at most 300 s
REQUEST_VALIDITY_S = 60


class RequestSigner:
    """Signs requests for one grantee (account + Umbral key) against one registry."""

    def __init__(self, account: LocalAccount, umbral_public_key: bytes, domain: Domain) -> None:
        self._account = account
        self._umbral_key = umbral_public_key
        self._domain = domain

    def single(
        self,
        patient: str,
        record_id: bytes,
        capsule: bytes,
        purpose_of_use: str = "TREAT",
        *,
        validity_s: int = REQUEST_VALIDITY_S,
    ) -> common_pb2.ReencryptionRequest:
        claims = RequestClaims(
            patient=patient,
            record_id=record_id,
            capsule_hash=capsule_hash(capsule),
            requester_umbral_key=self._umbral_key,
            nonce=secrets.token_bytes(32),
            deadline=int(time.time()) + validity_s,
            purpose_of_use=purpose_of_use,
        )
        return common_pb2.ReencryptionRequest(
            request_id=uuid.uuid4().hex,
            patient=address_bytes(claims.patient),
            record_id=record_id,
            capsule=capsule,
            requester=address_bytes(self._account.address),
            requester_umbral_key=self._umbral_key,
            purpose_of_use=purpose_of_use,
            deadline=claims.deadline,
            nonce=claims.nonce,
            signature=sign(self._account, self._domain, claims),
        )

    def batch(
        self,
        patient: str,
        capsules: Sequence[tuple[bytes, bytes]],
        purpose_of_use: str = "TREAT",
        *,
        validity_s: int = REQUEST_VALIDITY_S,
    ) -> common_pb2.ReencryptionBatchRequest:
        """``capsules`` are (record id, capsule) pairs, in the order they are signed."""
        claims = BatchClaims(
            patient=patient,
            record_ids=tuple(r for r, _ in capsules),
            capsule_hashes=tuple(capsule_hash(c) for _, c in capsules),
            requester_umbral_key=self._umbral_key,
            nonce=secrets.token_bytes(32),
            deadline=int(time.time()) + validity_s,
            purpose_of_use=purpose_of_use,
        )
        return common_pb2.ReencryptionBatchRequest(
            request_id=uuid.uuid4().hex,
            patient=address_bytes(claims.patient),
            capsules=[common_pb2.CapsuleRef(record_id=r, capsule=c) for r, c in capsules],
            requester=address_bytes(self._account.address),
            requester_umbral_key=self._umbral_key,
            purpose_of_use=purpose_of_use,
            deadline=claims.deadline,
            nonce=claims.nonce,
            signature=sign(self._account, self._domain, claims),
        )
