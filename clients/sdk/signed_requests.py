"""Building signed re-encryption requests (EIP-712), as the grantee's app sends them,
and the patient's signed enrollments.

The one place where the wire messages and the typed data a wallet signs are put
together, so that what is signed is exactly what is sent. A request's ``request_id``
is the id every hop derives from it (:func:`~core.request_auth.request_id_of`),
which the nodes' audit logs record.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import TypeVar

from eth_account.signers.local import LocalAccount

from core.kfrag_delivery import delivery_binding, seal_for_node
from core.record_types import RecordType
from core.registry_types import NodeInfo
from core.request_auth import (
    BatchClaims,
    DigestSigner,
    Domain,
    EnrollmentClaims,
    RequestClaims,
    id_of_digest,
    sign,
    signing_digest,
)
from core.requests import SealedKfrag, SignedRequestFields, address_bytes
from core.umbral_codec import capsule_hash
from proto.kms.v1 import common_pb2

#: how long a signed request stays valid; nodes accept at most 300 s
REQUEST_VALIDITY_S = 60

_Request = TypeVar("_Request", bound=SignedRequestFields)


class RequestSigner:
    """Signs requests for one grantee (account + Umbral key) against one registry.

    A single request and a batch differ only in what they ask for (one capsule, or a
    list of them) and so in the EIP-712 struct signed; the rest of the message is
    filled in, and signed, in one place (:meth:`_signed`)."""

    def __init__(self, account: LocalAccount, umbral_public_key: bytes, domain: Domain) -> None:
        self._account = account
        self._key = DigestSigner(account)
        self._umbral_key = umbral_public_key
        self._domain = domain

    def single(
        self,
        patient: str,
        record_id: bytes,
        record_type: RecordType,
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
        request = common_pb2.ReencryptionRequest(
            record_id=record_id, record_type=int(record_type), capsule=capsule
        )
        return self._signed(request, claims)

    def batch(
        self,
        patient: str,
        capsules: Sequence[tuple[bytes, RecordType, bytes]],
        purpose_of_use: str = "TREAT",
        *,
        validity_s: int = REQUEST_VALIDITY_S,
    ) -> common_pb2.ReencryptionBatchRequest:
        """``capsules`` are (record id, record type, capsule), in the order they are signed."""
        claims = BatchClaims(
            patient=patient,
            record_ids=tuple(r for r, _, _ in capsules),
            capsule_hashes=tuple(capsule_hash(c) for _, _, c in capsules),
            requester_umbral_key=self._umbral_key,
            nonce=secrets.token_bytes(32),
            deadline=int(time.time()) + validity_s,
            purpose_of_use=purpose_of_use,
        )
        request = common_pb2.ReencryptionBatchRequest(
            capsules=[
                common_pb2.CapsuleRef(record_id=r, record_type=int(t), capsule=c)
                for r, t, c in capsules
            ]
        )
        return self._signed(request, claims)

    def _signed(self, request: _Request, claims: RequestClaims | BatchClaims) -> _Request:
        """``request`` with the rest of ``claims`` (whose records, the grantee's key, why,
        until when), the signature over them, and the id derived from it."""
        digest = signing_digest(self._domain, claims)  # once, for the id and the signature
        request.request_id = id_of_digest(digest)
        request.patient = address_bytes(claims.patient)
        request.requester = address_bytes(self._account.address)
        request.requester_umbral_key = claims.requester_umbral_key
        request.purpose_of_use = claims.purpose_of_use
        request.deadline = claims.deadline
        request.nonce = claims.nonce
        request.signature = self._key.sign(digest)
        return request


def sealed_enrollment(
    patient: LocalAccount,
    domain: Domain,
    node: NodeInfo,
    grantee: str,
    receiving_key: bytes,
    kfrags: Mapping[RecordType, bytes],
    *,
    validity_s: int = REQUEST_VALIDITY_S,
    now: float | None = None,
) -> common_pb2.EnrollKeyFragmentRequest:
    """The patient's enrollment of one kfrag per record type at ``node``: each kfrag
    sealed to the node's registered delivery key, bound to the node and the grant; the
    whole signed by the patient, with a fresh nonce. Anyone may carry it; only that node
    can open it, and only once: to enroll again (after a failure too), make a new one."""
    sealed = []
    for record_type, kfrag in kfrags.items():
        binding = delivery_binding(
            node.node_id, patient.address, grantee, receiving_key, int(record_type)
        )
        ephemeral, ciphertext = seal_for_node(
            node.delivery_public_key, kfrag, info=binding, aad=binding
        )
        sealed.append(SealedKfrag(record_type, ephemeral, ciphertext))
    claims = EnrollmentClaims(
        node_id=node.node_id,
        patient=patient.address,
        grantee=grantee,
        receiving_key=receiving_key,
        record_types=tuple(int(k.record_type) for k in sealed),
        sealed_hashes=tuple(k.sha256 for k in sealed),
        nonce=secrets.token_bytes(32),
        deadline=int(time.time() if now is None else now) + validity_s,
    )
    return common_pb2.EnrollKeyFragmentRequest(
        node_id=node.node_id,
        patient=address_bytes(claims.patient),
        grantee=address_bytes(claims.grantee),
        receiving_key=receiving_key,
        kfrags=[
            common_pb2.SealedKeyFragment(
                record_type=int(k.record_type),
                ephemeral_public_key=k.ephemeral_public_key,
                sealed=k.sealed,
            )
            for k in sealed
        ],
        deadline=claims.deadline,
        nonce=claims.nonce,
        signature=sign(patient, domain, claims),
    )
