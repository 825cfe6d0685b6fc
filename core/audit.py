"""The audit log's data and its verification: entries, receipts, checkpoints. Pure, no I/O.

Every decision a node makes, granted or denied, is an :class:`AuditEntry`. Its
:meth:`~AuditEntry.canonical_bytes` are the data of one leaf of the node's RFC 9162 Merkle
tree (:mod:`core.merkle`). The node answers each request with a signed
:class:`Receipt` (this entry is leaf ``i``) and publishes signed :class:`Checkpoint` s (the
tree of ``n`` leaves has this root); auditors check both with the functions here, holding
only the node's public key.

Signatures are ECDSA P-256 over SHA-256, DER-encoded with low S (as the node's key store
makes them), over a canonical encoding that starts with a domain-separation prefix, so a
receipt can never be taken for a checkpoint or for any other message the key signs.

Entries carry identifiers and hashes only: no key material, no record content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from core import bounded_json, merkle
from core.addresses import is_checksummed
from core.errors import IntegrityError, InvalidRequest
from core.formats import hex_0x
from core.node_identity import MAX_NODE_ID_BYTES
from core.record_types import RecordType

#: version 2 entries record the request's record type and receiving key; version 1
#: entries (written before) did not, and still verify
ENTRY_VERSION: Final = 2
_REQUEST_FIELDS: Final = ("record_type", "requester_umbral_key")
UMBRAL_KEY_SIZE: Final = 33
RECEIPT_DOMAIN: Final = b"medkms/receipt/v1\x00"
BATCH_RECEIPT_DOMAIN: Final = b"medkms/batch-receipt/v1\x00"
#: most entries one batch receipt covers (a request's batch is at most 64 capsules)
MAX_RECEIPT_BATCH: Final = 1024
CHECKPOINT_DOMAIN: Final = b"medkms/checkpoint/v1\x00"

GRANTED: Final = "granted"
DENIED: Final = "denied"
DECISIONS: Final = (GRANTED, DENIED)

HASH_SIZE: Final = 32
MAX_TEXT = 1024
# Above the largest valid entry (every text field at its limit, non-ASCII escaped): a bound
# on what is parsed (core/bounded_json.py).
MAX_ENTRY_BYTES: Final = 32 * 1024
#: an entry is one flat JSON object
MAX_ENTRY_DEPTH: Final = 1
#: the node's GetEntries serves at most this many entries per call (proto/kms/v1/audit.proto)
MAX_ENTRIES_PER_CALL: Final = 10_000
_UINT64_MAX = 2**64 - 1
_REASON_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Order of the P-256 group (SEC 2, section 2.4.2): signatures must have s <= n/2.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# --- field checks --------------------------------------------------------------------------


def _check_uint(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise InvalidRequest(f"{what} must be an integer in [0, 2^64), got {value!r}")


def _check_hash(value: bytes, what: str, *, empty_ok: bool = False) -> None:
    if not isinstance(value, bytes):
        raise InvalidRequest(f"{what} must be bytes")
    if len(value) != HASH_SIZE and not (empty_ok and not value):
        expected = f"{HASH_SIZE} bytes or empty" if empty_ok else f"{HASH_SIZE} bytes"
        raise InvalidRequest(f"{what} must be {expected}, got {len(value)} bytes")


def _check_text(value: str, what: str, *, max_len: int = MAX_TEXT) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty string")
    if len(value) > max_len or not value.isprintable():
        raise InvalidRequest(f"{what} must be at most {max_len} printable characters")


def _check_node_id(value: str) -> bytes:
    _check_text(value, "node_id")
    encoded = value.encode()
    if len(encoded) > MAX_NODE_ID_BYTES:
        raise InvalidRequest(f"node_id must be at most {MAX_NODE_ID_BYTES} bytes")
    return encoded


def _check_address(value: str, what: str) -> None:
    if not is_checksummed(value):
        raise InvalidRequest(f"{what} must be an EIP-55 checksummed address")


def _unhex(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise InvalidRequest(f"{what} must be a 0x-prefixed hex string")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise InvalidRequest(f"{what} is not valid hex") from None


# --- entries -------------------------------------------------------------------------------


_BYTES_FIELDS = ("record_id", "capsule_hash", "block_hash", "cfrag_hash", "requester_umbral_key")
#: fields whose values are each entry's own, so not worth sharing (see _SHARED_FIELDS)
_UNIQUE_FIELDS: Final = frozenset({"request_id", "time", "block_number", "cfrag_hash"})


@dataclass(frozen=True, slots=True)  # slots: an auditor holds 100,000s of them
class AuditEntry:
    """One decision of one node. The leaf data is :meth:`canonical_bytes`."""

    request_id: str
    node_id: str
    #: the node's wall clock when it decided, unix seconds
    time: int
    #: who asked (EIP-55 address)
    requester: str
    #: whose record (EIP-55 address)
    patient: str
    record_id: bytes
    capsule_hash: bytes
    #: HL7 v3 ActReason code, e.g. "TREAT"
    purpose_of_use: str
    #: "granted" or "denied"
    decision: str
    #: why: a :class:`core.policy.Reason` value, e.g. "granted", "grant_revoked"; any code
    #: of that form parses, so an auditor can read codes it does not know
    reason_code: str
    #: the sentence the requester was given
    reason: str
    #: the block the decision was judged at
    block_number: int
    #: that block's hash; all zeros when the node did not know it
    block_hash: bytes
    #: SHA-256 of the cfrag sent back; empty for a denial
    cfrag_hash: bytes
    #: what the request named: the record type and the requester's Umbral public key
    #: (compressed, 33 bytes), so that an auditor can judge every rule again; None in
    #: version 1 entries, which did not record them
    record_type: RecordType | None = None
    requester_umbral_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_text(self.request_id, "request_id", max_len=128)
        _check_node_id(self.node_id)
        _check_uint(self.time, "time")
        _check_address(self.requester, "requester")
        _check_address(self.patient, "patient")
        _check_hash(self.record_id, "record_id")
        _check_hash(self.capsule_hash, "capsule_hash")
        _check_text(self.purpose_of_use, "purpose_of_use", max_len=64)
        if self.decision not in DECISIONS:
            raise InvalidRequest(f"decision must be one of {', '.join(DECISIONS)}")
        if not isinstance(self.reason_code, str) or not _REASON_CODE.fullmatch(self.reason_code):
            raise InvalidRequest("reason_code must be 1-64 characters of a-z, 0-9 and _")
        _check_text(self.reason, "reason")
        _check_uint(self.block_number, "block_number")
        _check_hash(self.block_hash, "block_hash")
        _check_hash(self.cfrag_hash, "cfrag_hash", empty_ok=True)
        # A cfrag leaves the node exactly when access is granted.
        if (self.decision == GRANTED) != bool(self.cfrag_hash):
            raise InvalidRequest("cfrag_hash must be set for a granted entry and only then")
        if (self.record_type is None) != (self.requester_umbral_key is None):
            raise InvalidRequest("record_type and requester_umbral_key go together")
        if self.record_type is not None:
            if isinstance(self.record_type, bool) or not isinstance(self.record_type, int):
                raise InvalidRequest("record_type must be an integer")
            try:
                object.__setattr__(self, "record_type", RecordType(self.record_type))
            except ValueError:
                raise InvalidRequest(f"record_type {self.record_type} is not known") from None
            key = self.requester_umbral_key
            if not isinstance(key, bytes) or len(key) != UMBRAL_KEY_SIZE:
                raise InvalidRequest(
                    f"requester_umbral_key must be a {UMBRAL_KEY_SIZE}-byte compressed point"
                )

    @property
    def version(self) -> int:
        """2 if the entry records the request's record type and receiving key, else 1."""
        return 1 if self.record_type is None else ENTRY_VERSION

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON: sorted keys, no whitespace, ASCII only, bytes as 0x-hex, "v":
        the version (a version 1 entry has no record_type and requester_umbral_key)."""
        fields: dict[str, Any] = {"v": self.version}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None and name in _REQUEST_FIELDS:
                continue
            if name == "record_type":
                value = int(value)
            fields[name] = hex_0x(value) if name in _BYTES_FIELDS else value
        return json.dumps(
            fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")

    @classmethod
    def from_canonical(
        cls, data: bytes, *, shared: dict[object, object] | None = None
    ) -> AuditEntry:
        """Parse :meth:`canonical_bytes`; anything but the one canonical form is refused.

        Given ``shared`` (a reader's table, kept across entries), the values entries repeat
        (who asked, for which record, the reason, the block) are taken from it and added to
        it, so that a reader holding many entries holds each such value once."""
        fields = bounded_json.loads_object(
            data, max_bytes=MAX_ENTRY_BYTES, max_depth=MAX_ENTRY_DEPTH, what="audit entry"
        )
        version = fields.pop("v", None)
        if version not in (1, ENTRY_VERSION) or isinstance(version, bool):
            raise InvalidRequest(f"audit entry is not version 1 or {ENTRY_VERSION}")
        expected = set(cls.__dataclass_fields__)
        if version == 1:
            expected -= set(_REQUEST_FIELDS)
        if set(fields) != expected:
            missing = sorted(expected - set(fields))
            extra = sorted(set(fields) - expected)
            raise InvalidRequest(f"audit entry fields differ: missing {missing}, unknown {extra}")
        for name in _BYTES_FIELDS:
            if name in fields:
                fields[name] = _unhex(fields[name], name)
        if shared is not None:
            for name in _SHARED_FIELDS:
                value = fields.get(name)
                if isinstance(value, str | bytes):
                    fields[name] = shared.setdefault(value, value)
        entry = cls(**fields)
        # One entry, one encoding: whitespace, key order, hex case or escapes may not vary.
        if entry.canonical_bytes() != data:
            raise InvalidRequest("audit entry is not in canonical form")
        return entry

    def leaf_hash(self) -> bytes:
        """The entry's Merkle leaf hash (RFC 9162 2.1.1)."""
        return merkle.leaf_hash(self.canonical_bytes())


#: fields whose values many entries repeat: who asked, for what, the reason, the block
_SHARED_FIELDS: Final = tuple(
    name for name in AuditEntry.__dataclass_fields__ if name not in _UNIQUE_FIELDS
)


# --- receipts and checkpoints --------------------------------------------------------------


def _node_id_field(node_id: str) -> bytes:
    encoded = _check_node_id(node_id)
    return struct.pack(">H", len(encoded)) + encoded


class ReceiptFields(Protocol):
    node_id: str
    leaf_index: int
    tree_size: int
    entry_hash: bytes
    signature: bytes
    batch_start: int
    batch_size: int

    @property
    def batch_path(self) -> Sequence[bytes]: ...


@dataclass(frozen=True)
class Receipt:
    """The node's signed statement that an entry is leaf ``leaf_index`` of its log.

    A batch of entries appended together shares one signature: the node signs the
    RFC 9162 root of the batch's leaf hashes (leaves ``batch_start`` to
    ``batch_start + batch_size - 1``), and each receipt carries its entry's audit path
    in that small tree. A lone entry (``batch_size`` 1) is signed directly.
    """

    node_id: str
    leaf_index: int
    #: size of the log right after the append (leaf_index + 1 for a single writer)
    tree_size: int
    #: the entry's leaf hash
    entry_hash: bytes
    signature: bytes = field(default=b"", repr=False)
    #: first leaf of the batch this entry was appended with (``leaf_index`` if alone)
    batch_start: int | None = None
    batch_size: int = 1
    #: the entry's audit path in the batch's tree (empty if alone)
    batch_path: tuple[bytes, ...] = ()
    #: Not signed, not part of the node's statement: what the holder kept the receipt
    #: for, the id of its request and the SHA-256 of the fragment it came with (the SDK
    #: notes both, ``clients/sdk/provider.py``). A receipt names its entry only by hash,
    #: so a relay could attach another read's genuine receipt; an auditor who reads the
    #: entry compares these with it and names such a receipt (core/audit_log_checks.py).
    kept_for_request: str | None = None
    kept_cfrag_hash: bytes | None = None

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        _check_uint(self.leaf_index, "leaf_index")
        _check_uint(self.tree_size, "tree_size")
        if self.leaf_index >= self.tree_size:
            raise InvalidRequest("leaf_index must be below tree_size")
        _check_hash(self.entry_hash, "entry_hash")
        if not isinstance(self.signature, bytes):
            raise InvalidRequest("signature must be bytes")
        object.__setattr__(self, "batch_path", tuple(self.batch_path))
        _check_uint(self.batch_size, "batch_size")
        if not 1 <= self.batch_size <= MAX_RECEIPT_BATCH:
            raise InvalidRequest(f"batch_size must be 1 to {MAX_RECEIPT_BATCH}")
        start = self._start
        _check_uint(start, "batch_start")
        if not start <= self.leaf_index < start + self.batch_size <= self.tree_size:
            raise InvalidRequest("the batch must hold leaf_index and lie within tree_size")
        for i, node in enumerate(self.batch_path):
            _check_hash(node, f"batch_path[{i}]")
        if self.kept_for_request is not None:
            _check_text(self.kept_for_request, "kept_for_request", max_len=128)
        if self.kept_cfrag_hash is not None:
            _check_hash(self.kept_cfrag_hash, "kept_cfrag_hash")

    def kept_for(self, request_id: str, cfrag: bytes) -> Receipt:
        """This receipt with its holder's note: kept for ``request_id``, with ``cfrag``."""
        return dataclasses.replace(
            self, kept_for_request=request_id, kept_cfrag_hash=hashlib.sha256(cfrag).digest()
        )

    @classmethod
    def from_fields(cls, msg: ReceiptFields) -> Receipt:
        """From anything with the receipt's fields (the gRPC ``AuditReceipt``)."""
        return cls(
            node_id=msg.node_id,
            leaf_index=int(msg.leaf_index),
            tree_size=int(msg.tree_size),
            entry_hash=bytes(msg.entry_hash),
            signature=bytes(msg.signature),
            batch_start=int(msg.batch_start) if msg.batch_size > 1 else None,
            batch_size=max(1, int(msg.batch_size)),
            batch_path=tuple(bytes(p) for p in msg.batch_path),
        )

    @property
    def _start(self) -> int:
        return self.leaf_index if self.batch_start is None else self.batch_start

    def batch_root(self) -> bytes | None:
        """The root of the batch's tree that this entry's path implies (None if the path
        does not fit the batch)."""
        return merkle.root_from_inclusion_proof(
            self.entry_hash, self.leaf_index - self._start, self.batch_size, self.batch_path
        )

    def canonical_bytes(self) -> bytes:
        """What is signed. Alone: domain || u16 len || node_id || u64 leaf_index ||
        u64 tree_size || entry_hash. In a batch: batch domain || u16 len || node_id ||
        u64 batch_start || u64 batch_size || u64 tree_size || batch root (integers
        big-endian). A path that does not fit the batch yields bytes no node signs."""
        if self.batch_size == 1:
            return (
                RECEIPT_DOMAIN
                + _node_id_field(self.node_id)
                + struct.pack(">QQ", self.leaf_index, self.tree_size)
                + self.entry_hash
            )
        root = self.batch_root()
        return (
            BATCH_RECEIPT_DOMAIN
            + _node_id_field(self.node_id)
            + struct.pack(">QQQ", self._start, self.batch_size, self.tree_size)
            + (root if root is not None else b"")
        )


@dataclass(frozen=True)
class Checkpoint:
    """The node's signed statement that its log of ``tree_size`` entries has ``root``."""

    node_id: str
    tree_size: int
    root: bytes
    #: when the node signed it, unix seconds
    timestamp: int
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        _check_uint(self.tree_size, "tree_size")
        _check_hash(self.root, "root")
        _check_uint(self.timestamp, "timestamp")
        if not isinstance(self.signature, bytes):
            raise InvalidRequest("signature must be bytes")

    def canonical_bytes(self) -> bytes:
        """What is signed: domain || u16 len || node_id || u64 tree_size || root ||
        u64 timestamp (integers big-endian)."""
        return (
            CHECKPOINT_DOMAIN
            + _node_id_field(self.node_id)
            + struct.pack(">Q", self.tree_size)
            + self.root
            + struct.pack(">Q", self.timestamp)
        )


def verify_node_signature(message: bytes, signature: bytes, public_key_der: bytes) -> bool:
    """Whether ``signature`` is the node key's (``public_key_der``, DER SPKI) over ``message``:
    ECDSA P-256 / SHA-256, DER, low S only (each signature has one valid encoding)."""
    try:
        key = serialization.load_der_public_key(public_key_der)
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            return False
        r, s = decode_dss_signature(signature)
        if s > _P256_ORDER // 2 or encode_dss_signature(r, s) != signature:
            return False
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def verify_receipt(receipt: Receipt, public_key_der: bytes) -> bool:
    """Whether the receipt was signed by the node key ``public_key_der`` (DER SPKI); for
    a batch receipt, also whether its path leads to the signed batch root."""
    if receipt.batch_size > 1 and receipt.batch_root() is None:
        return False
    return verify_node_signature(receipt.canonical_bytes(), receipt.signature, public_key_der)


def verify_checkpoint(checkpoint: Checkpoint, public_key_der: bytes) -> bool:
    """Whether the checkpoint was signed by the node key ``public_key_der`` (DER SPKI)."""
    return verify_node_signature(checkpoint.canonical_bytes(), checkpoint.signature, public_key_der)


def verify_receipt_inclusion(
    receipt: Receipt, checkpoint: Checkpoint, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the receipt's entry in the checkpoint's tree (same node).

    Signatures are not checked here: see :func:`verify_receipt`, :func:`verify_checkpoint`.
    """
    return receipt.node_id == checkpoint.node_id and merkle.verify_inclusion(
        receipt.entry_hash, receipt.leaf_index, checkpoint.tree_size, proof, checkpoint.root
    )


def verify_checkpoint_consistency(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows the log of ``old`` is a prefix of the log of ``new`` (same node).

    Signatures are not checked here: see :func:`verify_checkpoint`.
    """
    return old.node_id == new.node_id and merkle.verify_consistency(
        old.tree_size, new.tree_size, old.root, new.root, proof
    )


def verified_leaf_hashes(receipts: Iterable[Receipt], public_key_der: bytes) -> dict[int, bytes]:
    """The leaf hashes that signed receipts vouch for, by leaf index.

    Raises :class:`IntegrityError` for a receipt whose signature does not verify, or for two
    validly signed receipts that give one leaf different hashes (the node equivocated).
    """
    known: dict[int, bytes] = {}
    for receipt in receipts:
        if not verify_receipt(receipt, public_key_der):
            raise IntegrityError(
                f"receipt for entry {receipt.leaf_index} of {receipt.node_id} does not verify"
            )
        previous = known.setdefault(receipt.leaf_index, receipt.entry_hash)
        if previous != receipt.entry_hash:
            raise IntegrityError(
                f"{receipt.node_id} signed two receipts for entry {receipt.leaf_index} "
                "with different hashes"
            )
    return known


# --- verifying a whole log -----------------------------------------------------------------


@dataclass(frozen=True)
class LogVerification:
    """The outcome of :func:`verify_log`: ``ok``, or the problem and, when known, its entry."""

    ok: bool
    #: the size of the tree that was checked (the checkpoint's)
    tree_size: int
    #: a sentence naming what failed; empty when ok
    problem: str = ""
    #: the first entry found to be wrong or missing, when the check can tell
    entry_index: int | None = None


def verify_log(
    entries: Iterable[bytes | tuple[int, bytes]],
    checkpoint: Checkpoint,
    public_key_der: bytes,
    *,
    known_leaf_hashes: Mapping[int, bytes] | None = None,
) -> LogVerification:
    """Check a node's log, as served, against a signed checkpoint.

    ``entries`` is the whole log in order: either the canonical entry bytes (the position
    is the leaf index) or ``(leaf_index, bytes)`` rows as the node serves them, in which case
    a gap or a row out of order is named.

    In order: the checkpoint's signature; that every entry is a canonical entry of the
    checkpoint's node; that each leaf hash vouched for earlier (``known_leaf_hashes``, e.g.
    from :func:`verified_leaf_hashes`) matches the served entry at its index; that no entry
    the checkpoint or a receipt covers is missing; and that the Merkle root of the first
    ``checkpoint.tree_size`` entries is the checkpoint's root. A root mismatch alone cannot
    say which entry changed; known leaf hashes can, and the first differing index is named.
    """
    size = checkpoint.tree_size

    def failed(problem: str, index: int | None = None) -> LogVerification:
        return LogVerification(False, size, problem, index)

    if not verify_checkpoint(checkpoint, public_key_der):
        return failed(f"checkpoint of {checkpoint.node_id} at size {size} does not verify")
    known = dict(known_leaf_hashes or {})
    leaf_hashes: list[bytes] = []
    for item in entries:
        index = len(leaf_hashes)
        if isinstance(item, tuple):
            served_index, data = item
            if served_index != index:
                if isinstance(served_index, int) and served_index > index:
                    return failed(
                        f"entry {index} is missing: the next row is {served_index}", index
                    )
                return failed(f"entry {index} is out of order: row {served_index!r} follows", index)
        else:
            data = item
        try:
            entry = AuditEntry.from_canonical(data)
        except InvalidRequest as e:
            return failed(f"entry {index} is not a valid audit entry: {e.message}", index)
        if entry.node_id != checkpoint.node_id:
            return failed(f"entry {index} is from node {entry.node_id!r}", index)
        leaf_hashes.append(merkle.leaf_hash(data))
        expected = known.get(index)
        if expected is not None and expected != leaf_hashes[index]:
            return failed(f"entry {index} differs from the entry the node vouched for", index)
    served = len(leaf_hashes)
    if served < size:
        return failed(
            f"entry {served} is missing: the log has {served} entries, "
            f"the checkpoint covers {size}",
            served,
        )
    beyond = [index for index in known if index >= served]
    if beyond:
        return failed(
            f"entry {min(beyond)} is missing: a receipt vouches for it, "
            f"the log has {served} entries",
            min(beyond),
        )
    if merkle.subtree_root(leaf_hashes, 0, size) != checkpoint.root:
        return failed(f"the first {size} entries do not have the checkpoint's root")
    return LogVerification(True, size)
