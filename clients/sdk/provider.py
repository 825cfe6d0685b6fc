"""The grantee's side of the SDK: read a record the patient shared.

The provider trusts neither the coordinator nor the blob store: the blob must
hash to the content hash on-chain, and the capsule must be the anchored one. The
capsule fragments of a kfrag set the app has not verified before are each verified
against the patient's registered keys and the app's own before they are combined.
Once a set has opened a record, its fragments are combined as relayed, unverified,
and verified one by one only if they do not open it (ADR 19: the set's precursor,
which the patient signed for this app, keeps them from being forged, and the DEK and
record are authenticated). Fragments that do not verify are reported back
(RetryReencrypt, ADR 14), and the coordinator answers with verified replacements and
takes the node that sent them out of rotation. Fragments that verify but come from
different kfrag sets (they cannot be combined) are reported too: the coordinator then
answers with fragments of the set that m nodes agree on. A fragment relayed twice
(the same bytes, or a second one under a node's name) is used once.

The receipts returned with a read are the app's evidence for an auditor, so they are
checked too: each must name the node whose fragment it came with and verify with that
node's signing key as registered on-chain; the coordinator could otherwise hand the app
receipts no node signed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, TypeVar

import grpc
import umbral_pre as umbral

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.parsed_objects import ParsedObjects, cached
from clients.sdk.records import open_envelope
from clients.sdk.signed_requests import RequestSigner
from clients.sdk.timeouts import DEFAULT_TIMEOUTS, Timeouts
from clients.sdk.verified_sets import VerifiedSets
from core.addresses import checksum
from core.audit import GRANTED, AuditEntry, Receipt, verify_receipt
from core.errors import (
    IntegrityError,
    InvalidRequest,
    KmsError,
    NotFound,
    PreconditionFailed,
    error_for_status,
)
from core.record_types import RecordType
from core.registry_interface import ProviderRegistry, RegistryReader
from core.registry_types import PatientInfo, RecordInfo
from core.requests import MAX_BATCH, parse_purpose
from core.umbral_codec import (
    VerificationError,
    capsule_hash,
    cfrag_kfrag_id,
    cfrag_precursor,
    is_umbral_panic,
    load_cfrag,
)
from proto import rpc
from proto.kms.v1 import common_pb2, coordinator_pb2, record_pb2
from proto.stubs import CoordinatorStub
from proto.transport import Transport


@contextmanager
def _answering(request_id: str) -> Iterator[None]:
    """Errors raised inside carry ``request_id``, the id of the signed request sent, under
    which every node's audit log (and so the auditor's report) holds its decisions."""
    try:
        yield
    except KmsError as e:
        e.request_id = request_id
        raise


@dataclass(frozen=True, repr=False)
class RecordRead:
    """A record as read: its plaintext, and the receipts of the nodes that served it."""

    plaintext: bytes
    receipts: tuple[Receipt, ...]

    def __repr__(self) -> str:  # never the record's contents
        return f"RecordRead({len(self.plaintext)} bytes, {len(self.receipts)} receipts)"


@dataclass(frozen=True)
class CheckedFragments:
    """A capsule's fragments as the app verified them: those that verify (and the
    fragments they came in, with their receipts), the nodes of those that do not (to
    report), and the nodes of those dropped as repeats (umbral refuses a fragment twice)."""

    verified: list[umbral.VerifiedCapsuleFrag]
    used: list[common_pb2.CapsuleFragment]
    bad: list[str]
    repeated: list[str] = field(default_factory=list)

    @property
    def inconsistent(self) -> bool:
        """Whether the verified fragments come from different kfrag sets, so that they
        cannot be combined (to report: one node replays a fragment of an earlier set, or
        missed the patient's last enrollment). About 0.04 ms a fragment: asked only when
        there is something to report or the record did not open."""
        return len({cfrag_precursor(c) for c in self.verified}) > 1


@dataclass(frozen=True)
class OpenedRecord:
    """A record opened: its plaintext and the fragments that opened it."""

    plaintext: bytes
    used: list[common_pb2.CapsuleFragment]

    def __repr__(self) -> str:  # never the record's contents
        return f"OpenedRecord({len(self.plaintext)} bytes, {len(self.used)} fragments)"


class NodeKeys:
    """The nodes' signing keys as registered on-chain, read once and kept: a key changes
    only when its node re-registers. The registry is read again when a receipt names a
    node not known, or does not verify with the key kept, at most once per read (see
    :meth:`checker`), so that a coordinator relaying forged receipts cannot make the app
    read the registry more than once a read."""

    def __init__(self, registry: RegistryReader) -> None:
        self._registry = registry
        self._keys: dict[str, bytes] = {}

    def checker(self) -> Callable[[Receipt], bool]:
        """For one read: whether a receipt verifies with its node's registered key. A batch
        receipt's signature is shared by every receipt of that node in the batch, so each
        distinct signed statement is verified once."""
        reread = False
        judged: dict[tuple[str, bytes, bytes], bool] = {}

        def verifies(receipt: Receipt) -> bool:
            nonlocal reread
            statement = (receipt.node_id, receipt.canonical_bytes(), receipt.signature)
            if statement in judged:
                return judged[statement]
            key = self._keys.get(receipt.node_id)
            ok = key is not None and verify_receipt(receipt, key)
            if not ok and not reread:
                reread = True
                self._keys = {n.node_id: n.signing_public_key for n in self._registry.list_nodes()}
                fresh = self._keys.get(receipt.node_id)
                ok = fresh is not None and fresh != key and verify_receipt(receipt, fresh)
            judged[statement] = ok
            return ok

        return verifies


@dataclass(frozen=True)
class ReadOfRecord:
    """What the app itself signed for one record of a read: with the facts a node sends
    with its receipt (``EntryFacts``), the audit entry that node logged for it."""

    request_id: str
    requester: str
    patient: str
    record_id: bytes
    capsule_hash: bytes
    record_type: RecordType
    purpose_of_use: str
    requester_umbral_key: bytes

    @classmethod
    def of(
        cls,
        request: common_pb2.ReencryptionRequest | common_pb2.ReencryptionBatchRequest,
        ref: common_pb2.CapsuleRef | None = None,
    ) -> ReadOfRecord:
        """Of a signed single request, or of one capsule (``ref``) of a signed batch."""
        if isinstance(request, common_pb2.ReencryptionRequest):
            record_id, capsule, record_type = (
                request.record_id,
                request.capsule,
                request.record_type,
            )
        else:
            assert ref is not None
            record_id, capsule, record_type = ref.record_id, ref.capsule, ref.record_type
        return cls(
            request_id=request.request_id,
            requester=checksum(bytes(request.requester)),
            patient=checksum(bytes(request.patient)),
            record_id=bytes(record_id),
            capsule_hash=capsule_hash(bytes(capsule)),
            record_type=RecordType(record_type),
            purpose_of_use=request.purpose_of_use,
            requester_umbral_key=bytes(request.requester_umbral_key),
        )

    def logged(self, fragment: common_pb2.CapsuleFragment) -> bool | None:
        """Whether ``fragment`` is the one its node logged for this read, by the entry its
        receipt vouches for (rebuilt from this read, the fragment and the receipt's
        facts); None if the receipt carries no facts to tell. Not whether the node signed
        the receipt: see :class:`NodeKeys`."""
        receipt = fragment.receipt
        if not receipt.HasField("entry"):
            return None
        try:
            entry = self.entry(fragment.node_id, receipt.entry, fragment.cfrag)
        except InvalidRequest:
            return False
        return hmac.compare_digest(entry.leaf_hash(), bytes(receipt.entry_hash))

    def entry(self, node_id: str, facts: common_pb2.EntryFacts, cfrag: bytes) -> AuditEntry:
        """The entry ``node_id`` logged when it served ``cfrag`` for this read, as it says."""
        return AuditEntry(
            request_id=self.request_id,
            node_id=node_id,
            time=int(facts.time),
            requester=self.requester,
            patient=self.patient,
            record_id=self.record_id,
            capsule_hash=self.capsule_hash,
            purpose_of_use=self.purpose_of_use,
            decision=GRANTED,
            reason_code=facts.reason_code,
            reason=facts.reason,
            block_number=int(facts.block_number),
            block_hash=bytes(facts.block_hash),
            cfrag_hash=hashlib.sha256(cfrag).digest(),
            record_type=self.record_type,
            requester_umbral_key=self.requester_umbral_key,
        )


def receipts_of(
    opened: OpenedRecord, read: ReadOfRecord, verifies: Callable[[Receipt], bool]
) -> RecordRead:
    """The record as read, with the receipts of the fragments that opened it. A receipt
    that is malformed, names another node than its fragment's, does not verify with that
    node's registered key (``verifies``), or is not for this read and this fragment (the
    entry rebuilt from ``read``, the fragment and the facts sent with the receipt does not
    hash to the receipt's entry hash) is an ``IntegrityError`` naming the request and the
    node: it would be no evidence for an auditor."""
    request_id = read.request_id

    def refused(problem: str) -> IntegrityError:
        error = IntegrityError(f"the coordinator relayed {problem}")
        error.request_id = request_id
        return error

    receipts = []
    for fragment in opened.used:
        node = fragment.node_id
        try:
            receipt = Receipt.from_fields(fragment.receipt)
        except InvalidRequest as e:
            raise refused(f"a malformed receipt for node {node!r}: {e.message}") from None
        if receipt.node_id != node:
            raise refused(f"a receipt of node {receipt.node_id!r} for node {node!r}'s fragment")
        if not verifies(receipt):
            raise refused(
                f"a receipt for node {node!r} that does not verify with its registered signing key"
            )
        if not read.logged(fragment):
            raise refused(
                f"a receipt for node {node!r} that is not for this request and its fragment "
                "(the node's entry it vouches for is another)"
            )
        # Noted too, for an auditor to compare with the entry in the node's log.
        receipts.append(receipt.kept_for(request_id, fragment.cfrag))
    return RecordRead(opened.plaintext, tuple(receipts))


Signed = TypeVar("Signed", common_pb2.ReencryptionRequest, common_pb2.ReencryptionBatchRequest)
Answer = TypeVar("Answer")
#: a read that ended in one of these never reached a decision (the coordinator stopped
#: while the call was open): it is signed again and sent again while its timeout lasts
RESENT_ON: Final = frozenset({grpc.StatusCode.CANCELLED})
#: at most this many resends of one read. Each resend is a freshly signed read that
#: the coordinator may keep and forward to the nodes for as long as it is valid (up to
#: 300 s, clients/sdk/signed_requests.py): a coordinator answering CANCELLED on purpose
#: must not collect one every pause for the whole timeout (some 20 in 10 s). A few cover
#: a coordinator that stopped and restarted.
MAX_RESENDS: Final = 3
#: the pause before the first resend, doubled after each one up to the maximum
RESEND_PAUSE_S: Final = 0.05
MAX_RESEND_PAUSE_S: Final = 0.5


def send_read(
    sign: Callable[[], Signed], send: Callable[[Signed, float], Answer], timeout_s: float
) -> tuple[Signed, Answer]:
    """Sign a read and send it with what is left of ``timeout_s``; again, freshly signed
    (a new nonce, so no node takes it for a replay), if it ended in :data:`RESENT_ON`, at
    most :data:`MAX_RESENDS` times. Errors are ``KmsError`` naming the coordinator and the
    id of the last request sent."""
    deadline = time.monotonic() + timeout_s
    pause = RESEND_PAUSE_S
    resends = 0
    while True:
        request = sign()
        try:
            return request, send(request, max(0.001, deadline - time.monotonic()))
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            resent = code in RESENT_ON
            if resent and resends < MAX_RESENDS and deadline - time.monotonic() > pause:
                time.sleep(pause)
                pause = min(2 * pause, MAX_RESEND_PAUSE_S)
                resends += 1
                continue
            error = rpc.error_from_rpc(e, "coordinator")
            if resent and resends == MAX_RESENDS:
                error = error_for_status(
                    error.grpc_status,
                    f"{error.message} (the read was signed and sent {1 + resends} times, "
                    "each cancelled by the coordinator: not sent again)",
                )
            error.request_id = request.request_id
            raise error from None


class ProviderClient:
    def __init__(
        self,
        identity: Identity,
        *,
        registry: ProviderRegistry,
        blobs: LocalBlobStore,
        coordinator_address: str,
        transport: Transport,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        """``transport`` secures the channel to the coordinator: TLS with the CA
        that signed its certificate (``Transport.tls(ca_cert)``)."""
        self.identity = identity
        self._registry = registry
        self._blobs = blobs
        self._timeouts = timeouts
        # The coordinator refuses calls past its limit per connection: they wait here
        # (at most rpc.APP_CALLS_PER_CONNECTION in flight).
        self._channel = rpc.bounded(
            transport.channel(coordinator_address, options=rpc.APP_CHANNEL_OPTIONS)
        )
        self._coordinator = CoordinatorStub(self._channel)
        self._signer = RequestSigner(
            identity.account,
            identity.umbral_public_key(),
            registry.signing_domain(),
        )
        #: cfrags are re-encrypted to it (derived once: each derivation costs)
        self._receiving_secret = identity.umbral_secret_key()
        self._receiving_key = self._receiving_secret.public_key()
        self._parsed = ParsedObjects()
        self._node_keys = NodeKeys(registry)
        self._verified_sets = VerifiedSets()
        self._records: dict[bytes, RecordInfo] = {}
        self._patients: dict[str, PatientInfo] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ProviderClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open_emergency_access(self, patient: str, duration_s: int) -> tuple[int, int]:
        """As an emergency-role holder, open a time-boxed emergency grant to a patient who
        opted in (at most the registry's maximum, 4 h); the patient sees the event. Reads
        under it must use purpose of use ETREAT. Returns (block mined in, expiry)."""
        tx = self._registry.open_emergency_access(
            self.identity.account, patient=patient, duration_s=duration_s
        )
        block = self._registry.block_of_transaction(tx)
        grant = self._registry.get_grant(patient, self.identity.address)
        if grant is None or not grant.emergency:
            raise PreconditionFailed("the registry shows no emergency grant after opening one")
        return block, grant.expires_at

    def read_record(self, record_id: bytes, purpose_of_use: str = "TREAT") -> bytes:
        """The record's plaintext FHIR JSON, if the patient's grant allows it."""
        opened, _ = self._read(record_id, purpose_of_use)
        return opened.plaintext

    def read_record_with_receipts(
        self, record_id: bytes, purpose_of_use: str = "TREAT"
    ) -> RecordRead:
        """The record's plaintext, with the audit receipt each node signed for the
        fragment it gave: the app's proof that those nodes logged its request, for an
        auditor (``kmsctl audit verify --receipts``) to check against their logs. After a
        retry (ADR 14) they are the receipts of the fragments that opened the record. Each
        is verified with its node's registered key (about 0.1 ms a receipt): one that does
        not verify is an ``IntegrityError`` naming the request and the node."""
        opened, read = self._read(record_id, purpose_of_use)
        return receipts_of(opened, read, self._node_keys.checker())

    def _read(self, record_id: bytes, purpose_of_use: str) -> tuple[OpenedRecord, ReadOfRecord]:
        """The record opened, and what the app signed to read it."""
        parse_purpose(purpose_of_use)
        record, envelope, patient = self._fetch(record_id)
        request, response = send_read(
            lambda: self._signer.single(
                patient.address, record_id, record.record_type, envelope.capsule, purpose_of_use
            ),
            lambda r, timeout_s: self._coordinator.Reencrypt(
                r, timeout=timeout_s, wait_for_ready=True
            ),
            self._timeouts.fan_out_s,
        )
        read = ReadOfRecord.of(request)
        with _answering(request.request_id):
            opened = self._open_as_relayed(patient, record, envelope, response.fragments, read)
            if opened is not None:
                return opened, read
            checked = self._check(patient, record, envelope, response.fragments)
            if not response.read_id:
                return self._open(patient, record, envelope, checked), read
            if not checked.bad:
                try:
                    return self._open(patient, record, envelope, checked), read
                except IntegrityError:
                    # Whether the fragments combine is asked only now: it costs about
                    # 0.04 ms a fragment, for what is rare.
                    if not checked.inconsistent:
                        raise
            reported = coordinator_pb2.RetryReadRequest(
                read_id=response.read_id,
                reported=[
                    coordinator_pb2.ReportedFragment(record_id=record_id, node_id=n)
                    for n in checked.bad
                ],
                inconsistent=[record_id] if checked.inconsistent else [],
            )
            response = self._retry(self._coordinator.RetryReencrypt, reported)
            checked = self._check(patient, record, envelope, response.fragments)
            return self._open(patient, record, envelope, checked), read

    def _retry(
        self,
        method: Callable[..., Answer],
        reported: coordinator_pb2.RetryReadRequest,
    ) -> Answer:
        """Report the fragments that did not verify; the coordinator's answer with
        verified replacements. Errors are ``KmsError`` naming the coordinator."""
        try:
            return method(reported, timeout=self._timeouts.fan_out_s)
        except grpc.RpcError as e:
            raise rpc.error_from_rpc(e, "coordinator") from None

    def read_records(
        self, record_ids: Sequence[bytes], purpose_of_use: str = "TREAT"
    ) -> dict[bytes, bytes | KmsError]:
        """Many records of one patient in one round trip (e.g. a patient's history):
        each record's plaintext, or the error that record met."""
        opened, _ = self._read_batch(record_ids, purpose_of_use)
        return {r: o if isinstance(o, KmsError) else o.plaintext for r, o in opened.items()}

    def read_records_with_receipts(
        self, record_ids: Sequence[bytes], purpose_of_use: str = "TREAT"
    ) -> dict[bytes, RecordRead | KmsError]:
        """As :meth:`read_records`, each record read with the receipts of the nodes whose
        fragments opened it (as :meth:`read_record_with_receipts`): they share each
        node's one signature over the batch, each with its entry's path in it (verified
        once a node)."""
        opened, reads = self._read_batch(record_ids, purpose_of_use)
        verifies = self._node_keys.checker()
        results: dict[bytes, RecordRead | KmsError] = {}
        for record_id, outcome in opened.items():
            try:
                results[record_id] = (
                    outcome
                    if isinstance(outcome, KmsError)
                    else receipts_of(outcome, reads[record_id], verifies)
                )
            except IntegrityError as e:
                results[record_id] = e
        return results

    def _read_batch(
        self, record_ids: Sequence[bytes], purpose_of_use: str
    ) -> tuple[dict[bytes, OpenedRecord | KmsError], dict[bytes, ReadOfRecord]]:
        """Each record opened, or the error it met; and what the app signed to read each."""
        parse_purpose(purpose_of_use)
        if not 1 <= len(record_ids) <= MAX_BATCH:
            raise InvalidRequest(f"read 1 to {MAX_BATCH} records at a time")
        if len(set(record_ids)) != len(record_ids):
            raise InvalidRequest("a batch read names each record once (a record id is repeated)")
        fetched = [self._fetch(r) for r in record_ids]
        patients = {patient.address for _, _, patient in fetched}
        if len(patients) != 1:
            raise InvalidRequest("a batch read covers the records of one patient")
        patient = fetched[0][2]
        request, response = send_read(
            lambda: self._signer.batch(
                patient.address,
                [(rec.record_id, rec.record_type, env.capsule) for rec, env, _ in fetched],
                purpose_of_use,
            ),
            lambda r, timeout_s: self._coordinator.ReencryptBatch(
                r, timeout=timeout_s, wait_for_ready=True
            ),
            self._timeouts.fan_out_s,
        )
        results: dict[bytes, OpenedRecord | KmsError] = {
            rec.record_id: IntegrityError("the coordinator returned no result for this record")
            for rec, _, _ in fetched
        }
        envelopes = {rec.record_id: (rec, env) for rec, env, _ in fetched}
        reads = {bytes(ref.record_id): ReadOfRecord.of(request, ref) for ref in request.capsules}

        def open_all(
            answers: Iterable[coordinator_pb2.CapsuleFragments],
        ) -> tuple[dict[bytes, list[str]], list[bytes]]:
            """Open each answered record not opened yet into ``results`` (a record opened
            keeps the fragments that opened it); the nodes of the fragments that did not
            verify, by record, and the records whose fragments do not combine."""
            bad: dict[bytes, list[str]] = {}
            inconsistent: list[bytes] = []
            for result in answers:
                record_id = bytes(result.record_id)
                if record_id not in envelopes or isinstance(results[record_id], OpenedRecord):
                    continue
                if result.status:
                    results[record_id] = error_for_status(result.status, result.reason)
                    continue
                record, envelope = envelopes[record_id]
                opened = self._open_as_relayed(
                    patient, record, envelope, result.fragments, reads[record_id]
                )
                if opened is not None:
                    results[record_id] = opened
                    continue
                try:
                    checked = self._check(patient, record, envelope, result.fragments)
                    if checked.bad:
                        bad[record_id] = checked.bad
                        if checked.inconsistent:
                            inconsistent.append(record_id)
                    try:
                        results[record_id] = self._open(patient, record, envelope, checked)
                    except IntegrityError:
                        # As for a single read: asked only when the record did not open.
                        if not checked.bad and checked.inconsistent:
                            inconsistent.append(record_id)
                        raise
                except KmsError as e:
                    results[record_id] = e
            return bad, inconsistent

        bad, inconsistent = open_all(response.results)
        if (bad or inconsistent) and response.read_id:
            reported = coordinator_pb2.RetryReadRequest(
                read_id=response.read_id,
                reported=[
                    coordinator_pb2.ReportedFragment(record_id=r, node_id=n)
                    for r, nodes in bad.items()
                    for n in nodes
                ],
                inconsistent=inconsistent,
            )
            try:
                retried = self._retry(self._coordinator.RetryReencryptBatch, reported)
                open_all(retried.results)
            except KmsError as e:
                for record_id in [*bad, *inconsistent]:
                    if isinstance(results[record_id], KmsError):  # not opened without it
                        results[record_id] = e
        for outcome in results.values():
            if isinstance(outcome, KmsError):
                outcome.request_id = request.request_id
        return results, reads

    # A record's anchor (patient, hashes, storage URI) and a patient's registered keys
    # never change once on-chain, so they are read once. Whether a record is still
    # active, and every grant, is judged by the nodes on each request.

    def _record(self, record_id: bytes) -> RecordInfo | None:
        return cached(self._records, record_id, self._registry.get_record)

    def _patient(self, address: str) -> PatientInfo | None:
        return cached(self._patients, address, self._registry.get_patient)

    def _fetch(self, record_id: bytes) -> tuple[RecordInfo, record_pb2.RecordEnvelope, PatientInfo]:
        """The record's envelope from the blob store, checked against the chain."""
        if len(record_id) != 32:
            raise InvalidRequest("record_id must be 32 bytes")
        record = self._record(record_id)
        if record is None:
            raise NotFound(f"record 0x{record_id.hex()} is not in the registry")
        blob = self._blobs.get(record.storage_uri)
        if not hmac.compare_digest(hashlib.sha256(blob).digest(), record.content_hash):
            raise IntegrityError("stored record does not match the content hash on-chain")
        envelope = self._parsed.envelope(blob)
        if envelope.record_id != record_id:
            raise IntegrityError("stored envelope names a different record")
        if not hmac.compare_digest(capsule_hash(envelope.capsule), record.capsule_hash):
            raise IntegrityError("stored capsule is not the one anchored on-chain")
        patient = self._patient(record.patient)
        if patient is None:
            raise PreconditionFailed("the record's patient is not registered")
        return record, envelope, patient

    def _open_as_relayed(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        fragments: Iterable[common_pb2.CapsuleFragment],
        read: ReadOfRecord,
    ) -> OpenedRecord | None:
        """The record opened with the fragments as relayed (a repeat used once), none
        verified first, if every one is of a kfrag set this client verified before
        (:class:`VerifiedSets`) and, where its receipt says what its node logged, is that
        fragment (:meth:`ReadOfRecord.logged`, about 0.03 ms); None otherwise, or if they
        do not open it: they are then verified one by one (:meth:`_check`) to find and
        report the bad ones (ADR 19). A fragment changed after its node logged it (say,
        a flipped bit in its proof, which decryption does not use) is so still found.

        Why it is safe: umbral's ``decrypt_reencrypted`` checks one equation, which
        anyone can satisfy under a precursor of their own (they can compute its shared
        secret with this app's key), but not under a precursor the patient signed for
        this app: that needs the app's secret key. So under a verified set's precursor,
        only fragments whose combination is the capsule's own key open the DEK (umbral's
        DEM, XChaCha20-Poly1305, and the record's AES-GCM authenticate both, and the
        capsule and encrypted DEK are the ones anchored on-chain). It saves a
        ``CapsuleFrag.verify`` a fragment (about 0.4 ms each, the largest part of a
        read's CPU in the app), for about 0.04 ms a fragment to read its precursor."""
        delegating = patient.umbral_key(record.record_type)
        used: list[common_pb2.CapsuleFragment] = []
        cfrags: list[umbral.VerifiedCapsuleFrag] = []
        seen: set[bytes] = set()
        nodes: set[str] = set()
        for fragment in fragments:
            if fragment.cfrag in seen or fragment.node_id in nodes:
                continue
            seen.add(fragment.cfrag)
            nodes.add(fragment.node_id)
            if read.logged(fragment) is False:
                return None
            try:
                cfrag = load_cfrag(fragment.cfrag)
            except InvalidRequest:
                return None
            if not self._verified_sets.knows(
                delegating, patient.verifying_key, cfrag_precursor(cfrag)
            ):
                return None
            cfrags.append(cfrag.skip_verification())
            used.append(fragment)
        capsule = self._parsed.capsule(envelope.capsule)
        delegating_key = self._parsed.public_key(delegating)
        dek = _decrypt(self._receiving_secret, delegating_key, capsule, cfrags, envelope)
        if dek is None:
            return None
        try:
            return OpenedRecord(open_envelope(envelope, dek), used)
        except IntegrityError:
            return None

    def _check(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        fragments: Iterable[common_pb2.CapsuleFragment],
    ) -> CheckedFragments:
        """Verify the capsule fragments ourselves, against the patient's registered keys
        for the record's type and our own key. A fragment relayed again (the same bytes, or
        a second verified one of a node) is dropped, not reported: the coordinator repeated
        it, and umbral would refuse to combine it."""
        capsule = self._parsed.capsule(envelope.capsule)
        delegating_key = self._parsed.public_key(patient.umbral_key(record.record_type))
        verifying_key = self._parsed.public_key(patient.verifying_key)
        receiving_key = self._receiving_key
        checked = CheckedFragments([], [], [])
        seen: set[bytes] = set()
        nodes: set[str] = set()
        for fragment in fragments:
            if fragment.cfrag in seen or fragment.node_id in nodes:
                checked.repeated.append(fragment.node_id)
                continue
            seen.add(fragment.cfrag)
            try:
                cfrag = load_cfrag(fragment.cfrag)
                checked.verified.append(
                    cfrag.verify(capsule, verifying_key, delegating_key, receiving_key)
                )
                checked.used.append(fragment)
                nodes.add(fragment.node_id)
            except (InvalidRequest, VerificationError):
                checked.bad.append(fragment.node_id)  # dropped, and reported
        return checked

    def _open(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        checked: CheckedFragments,
    ) -> OpenedRecord:
        """The record opened with the verified fragments; their kfrag set is remembered
        as verified (ADR 19)."""
        dek = self._open_dek(patient, record, envelope, checked)
        opened = OpenedRecord(open_envelope(envelope, dek), checked.used)
        self._verified_sets.remember(
            patient.umbral_key(record.record_type),
            patient.verifying_key,
            cfrag_precursor(checked.verified[0]),  # they combined: one set, one precursor
        )
        return opened

    def _open_dek(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        checked: CheckedFragments,
    ) -> bytes:
        """Decapsulate the DEK from verified fragments with the patient's key for the
        record's type. Should umbral refuse them, fragments of one kfrag (relayed under
        different nodes' names) are dropped from ``checked`` and it is tried again."""
        capsule = self._parsed.capsule(envelope.capsule)
        delegating_key = self._parsed.public_key(patient.umbral_key(record.record_type))

        def decrypt() -> bytes | None:
            return _decrypt(
                self._receiving_secret, delegating_key, capsule, checked.verified, envelope
            )

        dek = decrypt()
        if dek is None and self._drop_repeated_kfrags(checked):
            dek = decrypt()
        if dek is None:
            repeated = (
                f" ({len(checked.repeated)} repeated fragments dropped)" if checked.repeated else ""
            )
            raise IntegrityError(
                f"could not open the record's key with {len(checked.verified)} valid capsule "
                f"fragments from the coordinator{repeated}"
            )
        return dek

    @staticmethod
    def _drop_repeated_kfrags(checked: CheckedFragments) -> bool:
        """Keep the first verified fragment of each kfrag; whether any was dropped."""
        kept: set[bytes] = set()
        dropped = False
        keep = []
        for cfrag, fragment in zip(checked.verified, checked.used, strict=True):
            # umbral refuses two cfrags of one kfrag ("Some of the CapsuleFrags are
            # repeated"), e.g. an earlier read's relayed again under another node's name.
            kfrag_id = cfrag_kfrag_id(cfrag)
            if kfrag_id in kept:
                checked.repeated.append(fragment.node_id)
                dropped = True
            else:
                kept.add(kfrag_id)
                keep.append((cfrag, fragment))
        if dropped:
            checked.verified[:] = [c for c, _ in keep]
            checked.used[:] = [f for _, f in keep]
        return dropped


def _decrypt(
    receiving_secret: umbral.SecretKey,
    delegating_key: umbral.PublicKey,
    capsule: umbral.Capsule,
    cfrags: Sequence[umbral.VerifiedCapsuleFrag],
    envelope: record_pb2.RecordEnvelope,
) -> bytes | None:
    """The DEK the fragments open, or None: umbral's refusal, and a panic in umbral
    (fragments crafted to combine to the point at infinity) alike."""
    try:
        dek = umbral.decrypt_reencrypted(
            receiving_secret, delegating_key, capsule, list(cfrags), envelope.encrypted_dek
        )
    except ValueError:
        return None
    except BaseException as e:
        if is_umbral_panic(e):
            return None
        raise
    return None if dek is None else bytes(dek)
