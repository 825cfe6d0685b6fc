"""The grantee's side of the SDK: read a record the patient shared.

The provider trusts neither the coordinator nor the blob store: the blob must
hash to the content hash on-chain, the capsule must be the anchored one, and
every capsule fragment is verified against the patient's registered keys
before it is used. The coordinator relays fragments without verifying them; the
fragments that do not verify are reported back (RetryReencrypt, ADR 14), and the
coordinator answers with verified replacements and takes the node that sent them
out of rotation. So are fragments that verify but come from different kfrag sets
(they cannot be combined): the coordinator then answers with fragments of the set
that m nodes agree on, and takes the others out of rotation.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, TypeVar

import grpc
import umbral_pre as umbral

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.parsed_objects import ParsedObjects, cached
from clients.sdk.records import open_envelope
from clients.sdk.signed_requests import RequestSigner
from clients.sdk.timeouts import DEFAULT_TIMEOUTS, Timeouts
from core.audit import Receipt
from core.errors import (
    IntegrityError,
    InvalidRequest,
    KmsError,
    NotFound,
    PreconditionFailed,
    error_for_status,
)
from core.registry_interface import ProviderRegistry
from core.registry_types import PatientInfo, RecordInfo
from core.requests import MAX_BATCH, parse_purpose
from core.umbral_codec import VerificationError, capsule_hash, cfrag_precursor, load_cfrag
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
    fragments they came in, with their receipts), and the nodes of those that do not
    (to report)."""

    verified: list[umbral.VerifiedCapsuleFrag]
    used: list[common_pb2.CapsuleFragment]
    bad: list[str]

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


def receipts_of(opened: OpenedRecord, request_id: str) -> RecordRead:
    """The record as read, with the receipts of the fragments that opened it; a malformed
    one is an ``IntegrityError`` naming the request."""
    try:
        receipts = tuple(Receipt.from_fields(f.receipt) for f in opened.used)
    except InvalidRequest as e:
        error = IntegrityError(f"the coordinator relayed a malformed receipt: {e.message}")
        error.request_id = request_id
        raise error from None
    return RecordRead(opened.plaintext, receipts)


Signed = TypeVar("Signed", common_pb2.ReencryptionRequest, common_pb2.ReencryptionBatchRequest)
Answer = TypeVar("Answer")
#: a read that ended in one of these never reached a decision (the coordinator stopped
#: while the call was open): it is signed again and sent again while its timeout lasts
RESENT_ON: Final = frozenset({grpc.StatusCode.CANCELLED})
#: the pause before the first resend, doubled after each one up to the maximum
RESEND_PAUSE_S: Final = 0.05
MAX_RESEND_PAUSE_S: Final = 0.5


def send_read(
    sign: Callable[[], Signed], send: Callable[[Signed, float], Answer], timeout_s: float
) -> tuple[Signed, Answer]:
    """Sign a read and send it with what is left of ``timeout_s``; again, freshly signed
    (a new nonce, so no node takes it for a replay), if it ended in :data:`RESENT_ON`.
    Errors are ``KmsError`` naming the coordinator and the id of the request sent."""
    deadline = time.monotonic() + timeout_s
    pause = RESEND_PAUSE_S
    while True:
        request = sign()
        try:
            return request, send(request, max(0.001, deadline - time.monotonic()))
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            if code in RESENT_ON and deadline - time.monotonic() > pause:
                time.sleep(pause)
                pause = min(2 * pause, MAX_RESEND_PAUSE_S)
                continue
            error = rpc.error_from_rpc(e, "coordinator")
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
        self._channel = rpc.bounded(transport.channel(coordinator_address))
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
        retry (ADR 14) they are the receipts of the fragments that opened the record."""
        opened, request_id = self._read(record_id, purpose_of_use)
        return receipts_of(opened, request_id)

    def _read(self, record_id: bytes, purpose_of_use: str) -> tuple[OpenedRecord, str]:
        """The record opened, and the id of the signed request that read it."""
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
        with _answering(request.request_id):
            checked = self._check(patient, record, envelope, response.fragments)
            if not response.read_id:
                return self._open(patient, record, envelope, checked), request.request_id
            if not checked.bad:
                try:
                    return self._open(patient, record, envelope, checked), request.request_id
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
            return self._open(patient, record, envelope, checked), request.request_id

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
        node's one signature over the batch, each with its entry's path in it."""
        opened, request_id = self._read_batch(record_ids, purpose_of_use)
        results: dict[bytes, RecordRead | KmsError] = {}
        for record_id, outcome in opened.items():
            try:
                results[record_id] = (
                    outcome if isinstance(outcome, KmsError) else receipts_of(outcome, request_id)
                )
            except IntegrityError as e:
                results[record_id] = e
        return results

    def _read_batch(
        self, record_ids: Sequence[bytes], purpose_of_use: str
    ) -> tuple[dict[bytes, OpenedRecord | KmsError], str]:
        """Each record opened, or the error it met; and the id of the signed request."""
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
        return results, request.request_id

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

    def _check(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        fragments: Iterable[common_pb2.CapsuleFragment],
    ) -> CheckedFragments:
        """Verify the capsule fragments ourselves, against the patient's registered keys
        for the record's type and our own key."""
        capsule = self._parsed.capsule(envelope.capsule)
        delegating_key = self._parsed.public_key(patient.umbral_key(record.record_type))
        verifying_key = self._parsed.public_key(patient.verifying_key)
        receiving_key = self._receiving_key
        checked = CheckedFragments([], [], [])
        for fragment in fragments:
            try:
                cfrag = load_cfrag(fragment.cfrag)
                checked.verified.append(
                    cfrag.verify(capsule, verifying_key, delegating_key, receiving_key)
                )
                checked.used.append(fragment)
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
        """The record opened with the verified fragments."""
        dek = self._open_dek(patient, record, envelope, checked)
        return OpenedRecord(open_envelope(envelope, dek), checked.used)

    def _open_dek(
        self,
        patient: PatientInfo,
        record: RecordInfo,
        envelope: record_pb2.RecordEnvelope,
        checked: CheckedFragments,
    ) -> bytes:
        """Decapsulate the DEK from verified fragments with the patient's key for the
        record's type."""
        capsule = self._parsed.capsule(envelope.capsule)
        delegating_key = self._parsed.public_key(patient.umbral_key(record.record_type))
        try:
            dek = umbral.decrypt_reencrypted(
                self._receiving_secret,
                delegating_key,
                capsule,
                checked.verified,
                envelope.encrypted_dek,
            )
        except ValueError:
            dek = None
        if dek is None:
            raise IntegrityError(
                f"could not open the record's key with {len(checked.verified)} valid capsule "
                "fragments from the coordinator"
            )
        return bytes(dek)
