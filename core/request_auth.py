"""Signed re-encryption requests: EIP-712 typed data, signer recovery, freshness.

The requesting app signs what it asks for as EIP-712 typed data, so any Ethereum
wallet (``eth_signTypedData_v4``) can sign it. Each node rebuilds the same claims
from the request it received, recovers the signer from the signature and judges
that address against the grant; the signer is the requester, nobody states it.

Domain: ``EIP712Domain(string name,string version,uint256 chainId,address
verifyingContract)`` with name "medkms", version "1", the chain id and the
registry contract's address, so a signature is valid for one registry on one
chain only. Primary types (each declared once, on its dataclass's fields, from which
its type string, type hash and encoding derive: :mod:`core.eip712`)::

    ReencryptionRequest(address patient,bytes32 recordId,bytes32 capsuleHash,
        bytes requesterUmbralKey,bytes32 nonce,uint64 deadline,string purposeOfUse)
    ReencryptionBatch(address patient,bytes32[] recordIds,bytes32[] capsuleHashes,
        bytes requesterUmbralKey,bytes32 nonce,uint64 deadline,string purposeOfUse)

    KeyFragmentEnrollment(string nodeId,address patient,address grantee,
        bytes receivingKey,uint8[] recordTypes,bytes32[] sealedHashes,bytes32 nonce,
        uint64 deadline)

The last is signed by the patient: it delivers sealed kfrags to one node (see
:mod:`core.kfrag_delivery`); ``sealedHashes[i]`` is the SHA-256 of the i-th
sealed kfrag's ephemeral key and ciphertext. Its nonce, like a request's, lets a
node accept one signed enrollment once.

A request's id (:func:`request_id_of`) is derived from its signing digest, so the
id every node's audit log records is one the requester signed: a relay cannot
rewrite it.

``capsuleHash`` is :func:`core.umbral_codec.capsule_hash` of the capsule
bytes; ``deadline`` is a Unix time in seconds. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Final

from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_keys.backends.native.main import NativeECCBackend
from eth_keys.datatypes import Signature
from eth_keys.exceptions import BadSignature
from eth_typing import Hash32
from eth_utils.exceptions import ValidationError as EthValidationError

from core.addresses import checksum
from core.eip712 import (
    ADDRESS,
    BYTES,
    BYTES32,
    STRING,
    UINT8,
    UINT64,
    UINT256,
    SignedStruct,
    signed_as,
)
from core.errors import InvalidRequest, Unauthenticated

try:
    import coincurve

    _HAVE_COINCURVE = True
except ImportError:  # pragma: no cover - coincurve is a pinned dependency
    _HAVE_COINCURVE = False

DOMAIN_NAME: Final = "medkms"
DOMAIN_VERSION: Final = "1"

SIGNATURE_SIZE: Final = 65
DIGEST_SIZE: Final = 32

# Order of the secp256k1 group. EIP-2: s must be in the lower half.
SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N: Final = SECP256K1_N // 2


@dataclass(frozen=True)
class Domain(SignedStruct):
    """The EIP-712 domain: one registry contract on one chain."""

    PRIMARY_TYPE: ClassVar[str] = "EIP712Domain"

    name: str = field(default=DOMAIN_NAME, init=False, metadata=signed_as("name", STRING))
    version: str = field(default=DOMAIN_VERSION, init=False, metadata=signed_as("version", STRING))
    chain_id: int = field(metadata=signed_as("chainId", UINT256))
    registry_address: str = field(metadata=signed_as("verifyingContract", ADDRESS))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chain_id == 0:
            raise InvalidRequest("chain_id must be a positive uint256")

    @cached_property
    def separator(self) -> bytes:
        """EIP-712 ``domainSeparator = hashStruct(eip712Domain)``, computed once per domain."""
        return self.hash_struct()


@dataclass(frozen=True)
class RequestClaims(SignedStruct):
    """What a ``ReencryptionRequest`` signature binds: one capsule of one record.

    ``patient`` is normalised to its EIP-55 checksum form. Whether the purpose of
    use is a known code is for request validation (:mod:`core.requests`)
    to decide; here any string is signable.
    """

    PRIMARY_TYPE: ClassVar[str] = "ReencryptionRequest"

    patient: str = field(metadata=signed_as("patient", ADDRESS))
    record_id: bytes = field(metadata=signed_as("recordId", BYTES32))
    capsule_hash: bytes = field(metadata=signed_as("capsuleHash", BYTES32))
    requester_umbral_key: bytes = field(metadata=signed_as("requesterUmbralKey", BYTES))
    nonce: bytes = field(metadata=signed_as("nonce", BYTES32))
    deadline: int = field(metadata=signed_as("deadline", UINT64))
    purpose_of_use: str = field(metadata=signed_as("purposeOfUse", STRING))


@dataclass(frozen=True)
class BatchClaims(SignedStruct):
    """What a ``ReencryptionBatch`` signature binds: several records' capsules, pairwise.

    ``record_ids[i]`` goes with ``capsule_hashes[i]``; the two must be equally
    long. Limits on the batch size belong to request validation, not here.
    """

    PRIMARY_TYPE: ClassVar[str] = "ReencryptionBatch"

    patient: str = field(metadata=signed_as("patient", ADDRESS))
    record_ids: tuple[bytes, ...] = field(metadata=signed_as("recordIds", BYTES32.array()))
    capsule_hashes: tuple[bytes, ...] = field(metadata=signed_as("capsuleHashes", BYTES32.array()))
    requester_umbral_key: bytes = field(metadata=signed_as("requesterUmbralKey", BYTES))
    nonce: bytes = field(metadata=signed_as("nonce", BYTES32))
    deadline: int = field(metadata=signed_as("deadline", UINT64))
    purpose_of_use: str = field(metadata=signed_as("purposeOfUse", STRING))

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.record_ids) != len(self.capsule_hashes):
            raise InvalidRequest("record_ids and capsule_hashes must have the same length")


@dataclass(frozen=True)
class EnrollmentClaims(SignedStruct):
    """What a patient's ``KeyFragmentEnrollment`` signature binds: the sealed kfrags, one
    per record type, delivered to one node for one grant's receiving key."""

    PRIMARY_TYPE: ClassVar[str] = "KeyFragmentEnrollment"

    node_id: str = field(metadata=signed_as("nodeId", STRING))
    patient: str = field(metadata=signed_as("patient", ADDRESS))
    grantee: str = field(metadata=signed_as("grantee", ADDRESS))
    receiving_key: bytes = field(metadata=signed_as("receivingKey", BYTES))
    record_types: tuple[int, ...] = field(metadata=signed_as("recordTypes", UINT8.array()))
    sealed_hashes: tuple[bytes, ...] = field(metadata=signed_as("sealedHashes", BYTES32.array()))
    nonce: bytes = field(metadata=signed_as("nonce", BYTES32))
    deadline: int = field(metadata=signed_as("deadline", UINT64))

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.record_types) != len(self.sealed_hashes):
            raise InvalidRequest("record_types and sealed_hashes must have the same length")


Claims = RequestClaims | BatchClaims | EnrollmentClaims


def typed_data(domain: Domain, claims: Claims) -> dict[str, Any]:
    """The EIP-712 JSON a wallet signs (``eth_signTypedData_v4``); JSON-serialisable."""

    def members(struct: type[SignedStruct]) -> list[dict[str, str]]:
        return [{"name": m.name, "type": m.type.name} for m in struct.members()]

    return {
        "types": {
            Domain.PRIMARY_TYPE: members(Domain),
            claims.PRIMARY_TYPE: members(type(claims)),
        },
        "primaryType": claims.PRIMARY_TYPE,
        "domain": domain.message(),
        "message": claims.message(),
    }


def signing_digest(domain: Domain, claims: Claims) -> bytes:
    """The 32-byte EIP-712 digest the requester signs.

    ``keccak256(0x19 0x01 || domainSeparator || hashStruct(message))``.
    """
    return keccak(b"\x19\x01" + domain.separator + claims.hash_struct())


#: how much of the signing digest a request id shows: 128 bits, as long as the random
#: ids that came before it, and far beyond accidental collisions
REQUEST_ID_BYTES: Final = 16


def request_id_of(domain: Domain, claims: Claims) -> str:
    """The id of a signed request (or batch, or enrollment): 32 lowercase hex digits, the
    first :data:`REQUEST_ID_BYTES` of its EIP-712 signing digest.

    The SDK, the coordinator and every node compute it the same way, so an app finds its
    request in the auditor's report under the id it was given, and a relay cannot make an
    audit log record another. The digest covers every signed field, the nonce included,
    so distinct requests get distinct ids (a collision takes about 2^64 signed requests
    of one's own, and gains nothing: every audit entry also names what was asked).
    """
    return id_of_digest(signing_digest(domain, claims))


def id_of_digest(digest: bytes) -> str:
    """:func:`request_id_of` from a signing digest already computed."""
    return digest[:REQUEST_ID_BYTES].hex()


def sign(account: LocalAccount, domain: Domain, claims: Claims) -> bytes:
    """The requester's signature, 65 bytes ``r || s || v`` with v in {27, 28} (low-S)."""
    # EIP-191 version 0x01 is EIP-712: the account hashes 0x19 0x01 || header || body,
    # which is exactly signing_digest(domain, claims).
    signable = SignableMessage(b"\x01", domain.separator, claims.hash_struct())
    return bytes(account.sign_message(signable).signature)


class DigestSigner:
    """One account's key, parsed once, signing EIP-712 digests: what :func:`sign` gives,
    byte for byte (RFC 6979 nonces, low-S, v in {27, 28}), without eth_account parsing
    the key and hashing the message again on every call (about 0.25 ms a request)."""

    __slots__ = ("_account", "_key")

    def __init__(self, account: LocalAccount) -> None:
        self._account = account
        self._key = coincurve.PrivateKey(bytes(account.key)) if _HAVE_COINCURVE else None

    def __repr__(self) -> str:  # never the key
        return f"DigestSigner({self._account.address})"

    def sign(self, digest: bytes) -> bytes:
        """The 65-byte ``r || s || v`` signature of ``digest`` (see :func:`signing_digest`)."""
        if len(digest) != DIGEST_SIZE:
            raise InvalidRequest(f"digest must be {DIGEST_SIZE} bytes")
        if self._key is None:  # pragma: no cover - coincurve is a pinned dependency
            return bytes(self._account.unsafe_sign_hash(Hash32(digest)).signature)
        # libsecp256k1 signs low-S (EIP-2); its recovery id is 0 or 1, Ethereum's v 27 or 28
        signature = self._key.sign_recoverable(digest, hasher=None)
        return signature[:64] + bytes((signature[64] + 27,))


# --- signer recovery ------------------------------------------------------------------------

# Recovers the 64-byte public key (X || Y) from a digest, r || s (64 bytes) and recovery id 0/1.
_PublicKeyRecovery = Callable[[bytes, bytes, int], bytes]


_NATIVE_BACKEND: Final = NativeECCBackend()


def _recover_with_eth_keys(digest: bytes, rs: bytes, recovery_id: int) -> bytes:
    """Pure-Python fallback through eth_keys' native backend."""
    # Named explicitly: left to itself, eth_keys picks coincurve whenever it is importable.
    r, s = int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big")
    try:
        signature = Signature(vrs=(recovery_id, r, s), backend=_NATIVE_BACKEND)
        return bytes(signature.recover_public_key_from_msg_hash(digest).to_bytes())
    except (BadSignature, EthValidationError, ValueError) as e:
        raise Unauthenticated("signature does not recover to a public key") from e


def _recover_with_coincurve(digest: bytes, rs: bytes, recovery_id: int) -> bytes:
    """libsecp256k1 through coincurve: the fast path (about 35 µs here, vs 4.4 ms pure Python)."""
    try:
        public_key = coincurve.PublicKey.from_signature_and_message(
            rs + bytes((recovery_id,)), digest, hasher=None
        )
    except ValueError as e:
        raise Unauthenticated("signature does not recover to a public key") from e
    return public_key.format(compressed=False)[1:]


#: every available implementation, by name; the tests run each of them
RECOVERY_BACKENDS: dict[str, _PublicKeyRecovery] = {"eth_keys": _recover_with_eth_keys}
if _HAVE_COINCURVE:
    RECOVERY_BACKENDS["coincurve"] = _recover_with_coincurve
#: the one recover_signer uses: the fastest available
RECOVERY_BACKEND: Final = "coincurve" if _HAVE_COINCURVE else "eth_keys"
_recover_public_key: _PublicKeyRecovery = RECOVERY_BACKENDS[RECOVERY_BACKEND]


def recover_signer(digest: bytes, signature: bytes) -> str:
    """The checksum address that signed ``digest``.

    Accepts only the canonical form ``r || s || v`` with v in {27, 28},
    0 < r < n and 0 < s <= n/2 (EIP-2 low-S), so each signer has exactly one
    valid signature per digest. Anything else raises :class:`Unauthenticated`.
    """
    if len(digest) != DIGEST_SIZE:
        raise InvalidRequest(f"digest must be {DIGEST_SIZE} bytes")
    if not isinstance(signature, bytes | bytearray | memoryview):
        raise Unauthenticated("signature must be bytes")
    signature = bytes(signature)
    if len(signature) != SIGNATURE_SIZE:
        raise Unauthenticated(
            f"signature must be {SIGNATURE_SIZE} bytes (r || s || v), got {len(signature)}"
        )
    v = signature[64]
    if v not in (27, 28):
        raise Unauthenticated("signature recovery byte v must be 27 or 28")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < r < SECP256K1_N:
        raise Unauthenticated("signature r is out of range")
    if not 0 < s <= _HALF_N:
        raise Unauthenticated("signature s is zero or not in the lower half of the curve order")
    public_key = _recover_public_key(digest, signature[:64], v - 27)
    # Ethereum address: the last 20 bytes of keccak256 of the uncompressed key (X || Y).
    return checksum(keccak(public_key)[-20:])


def signer_of(domain: Domain, claims: Claims, signature: bytes) -> str:
    """The address that signed these claims in this domain (the requester)."""
    return recover_signer(signing_digest(domain, claims), signature)


# --- freshness ------------------------------------------------------------------------------


#: the longest ``request_window_s`` a node or coordinator may be configured with. The
#: window is how long a signed request stays usable (a copy of one can be replayed at a
#: node that has not seen its nonce until its deadline), and how long a node keeps its
#: nonce (kms_node/replay.py): live nonces are up to the accepted rate times the window,
#: and at ``replay_max_entries`` (1 000 000 by default) the node refuses every new
#: request until some expire. With full-window deadlines the default memory fills at
#: 278 accepted requests/s with an hour's window, below what one node process serves
#: (about 450/s); at the default 300 s, only at 3333/s.
MAX_REQUEST_WINDOW_S = 3600


def check_deadline(deadline: int, now: float, max_window_s: int) -> None:
    """Refuse a request whose deadline has passed, or lies more than ``max_window_s`` ahead.

    The upper bound is what lets a node forget a nonce once its deadline is past
    (see :class:`kms_node.replay.ReplayGuard`): a signature can never be used
    for longer than the window.
    """
    if deadline <= now:
        raise Unauthenticated("request deadline has passed")
    if deadline > now + max_window_s:
        raise InvalidRequest(f"deadline too far in the future; at most {max_window_s} s")


def authenticate(
    domain: Domain,
    claims: Claims,
    signature: bytes,
    requester: str,
    *,
    now: float,
    max_window_s: int,
) -> None:
    """Check the request is fresh and signed by ``requester``; raise Unauthenticated
    (or InvalidRequest for a deadline beyond the window) otherwise."""
    authenticate_digest(
        signing_digest(domain, claims),
        claims.deadline,
        signature,
        requester,
        now=now,
        max_window_s=max_window_s,
        who="patient" if isinstance(claims, EnrollmentClaims) else "requester",
    )


def authenticate_digest(
    digest: bytes,
    deadline: int,
    signature: bytes,
    signer: str,
    *,
    now: float,
    max_window_s: int,
    who: str = "requester",
) -> None:
    """:func:`authenticate` for claims whose signing digest is already computed (a parsed
    request's, :attr:`core.requests.ReencryptionQuery.digest`), so it is not hashed twice;
    ``deadline`` must be the one the digest covers."""
    check_deadline(deadline, now, max_window_s)
    if recover_signer(digest, signature) != signer:
        raise Unauthenticated(f"signature is not by the {who}")
