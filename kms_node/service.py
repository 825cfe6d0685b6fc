"""What a node does for each RPC, independent of gRPC plumbing.

Enrollment: the patient signs it (EIP-712) and seals each kfrag (one per record
type) to this node's HSM delivery key. A kfrag is accepted only if the signature
is the registered patient's, its nonce is new here (one signed enrollment is
accepted once), it opens inside the HSM, the grant (or the patient's
standing emergency opt-in) covers its type and names its receiving key, and it
verifies against the patient's registered key for that type. It is then stored
wrapped by the HSM's key-encryption key, bound (AAD) to this node, the patient,
the grantee, the receiving key and the type.

Re-encryption: the request is validated (its id derived from what the requester
signed, so the audit entry's id is the requester's), the registry state is read at one
block, the policy judges it; only if allowed is the kfrag unwrapped, used once
and dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
import umbral_pre as umbral

from core.audit import DENIED, GRANTED, AuditEntry, Receipt
from core.capsule_cache import CapsuleCache
from core.errors import (
    AccessDenied,
    InvalidRequest,
    KmsError,
    PreconditionFailed,
    Unauthenticated,
)
from core.kfrag_delivery import delivery_binding
from core.policy import FINAL_DENIALS, Decision, Reason, judge
from core.rate_limit import ENROLLMENT_COST, REFUSAL_COST, RateLimiter, request_cost
from core.record_types import RecordType, from_mask
from core.registry_interface import AccessStateSource, GrantReader
from core.registry_types import (
    AccessRevoked,
    EmergencyOptInChanged,
    PatientInfo,
    RegistryEvent,
)
from core.request_auth import Domain, authenticate, authenticate_digest
from core.requests import (
    MAX_BATCH,
    MAX_MANY_READS,
    BatchQuery,
    Enrollment,
    ReencryptionQuery,
    SealedKfrag,
    parse_capsules,
)
from core.umbral_codec import VerificationError, load_kfrag, load_public_key
from kms_node.keystore import KeyStore
from kms_node.kfrag_cache import KfragCache
from kms_node.kfrag_store import EnrollmentAlreadyStored, KfragStore, StoredKfrag
from kms_node.replay import NonceMemory, NonceReused, ServedBeforeStart
from proto.kms.v1 import common_pb2, node_pb2

log = structlog.get_logger("medkms.node")

SOFTWARE_VERSION = "0.1.0"
SIGNING_ALGORITHM = "ecdsa-p256-sha256"
_AAD_LABEL = b"medkms/kfrag/v1"
#: chain reads per second for enrollments by patients the index does not know (a patient
#: is known once her registration is indexed, within a poll interval)
UNKNOWN_PATIENT_READS_PER_S = 5.0
#: chain reads per second to confirm that a record the index does not know is unknown,
#: for requesters holding no kfrag here (the coordinator admits few of those)
UNKNOWN_RECORD_READS_PER_S = 10.0
ENROLLMENT_REPLAYED = (
    "enrollment already received (nonce already used); the patient must sign a new one"
)


@dataclasses.dataclass
class JudgedRead:
    """One read judged and served, its audit entries not yet durable: no answer may
    leave before they are."""

    queries: Sequence[ReencryptionQuery]
    results: list[bytes | KmsError]
    entries: list[AuditEntry]


class NeedsChain(Exception):
    """Judging this read needs a chain read (a refusal to confirm, a record the index does
    not know, a block's hash): raised by ``judge(..., chain_ok=False)`` before any side
    effect, so the server judges the read again where a thread may wait on the chain."""


class AuditSink(Protocol):
    """Where decisions go (kms_node/audit_log.py): durable before append returns."""

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]: ...


class IndexedState(AccessStateSource, Protocol):
    """The node's local grant index (see chain_follower): no round trip, fresh within
    its bound or it raises UNAVAILABLE."""

    def index_block(self) -> int: ...
    def is_registered(self, address: str) -> bool: ...


def kfrag_aad(
    node_id: str, patient: str, grantee: str, receiving_key: bytes, record_type: int
) -> bytes:
    """Associated data binding a wrapped kfrag to its node and policy."""
    parts = [_AAD_LABEL, node_id.encode(), bytes.fromhex(patient[2:]), bytes.fromhex(grantee[2:])]
    parts += [receiving_key, bytes((record_type,))]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


class NodeService:
    def __init__(
        self,
        *,
        node_id: str,
        keystore: KeyStore,
        kfrags: KfragStore,
        registry: GrantReader,
        index: IndexedState,
        registry_address: str,
        chain_id: int,
        replay: NonceMemory,
        limiter: RateLimiter,
        served_before_start: ServedBeforeStart | None = None,
        audit: AuditSink,
        request_window_s: int = 300,
        clock: Callable[[], float] = time.time,
        capsules: CapsuleCache | None = None,
        unwrapped: KfragCache | None = None,
        processes: int = 1,
    ) -> None:
        """``processes``: how many server processes serve this node, each with its own
        NodeService; the node-wide budgets below are split between them, as ``limiter``
        (a requester's) is by the caller (RateLimiter.share_of)."""
        self.node_id = node_id
        self._keystore = keystore
        self._kfrags = kfrags
        self._registry = registry
        self._index = index
        self._registry_address = registry_address
        self._chain_id = chain_id
        # Signatures are valid for this registry on this chain only (EIP-712 domain).
        self._domain = Domain(chain_id, registry_address)
        self._replay = replay
        self._served_before_start = (
            served_before_start if served_before_start is not None else ServedBeforeStart({}, 0)
        )
        self._limiter = limiter
        self._unknown_record_reads = RateLimiter.share_of(
            UNKNOWN_RECORD_READS_PER_S, int(UNKNOWN_RECORD_READS_PER_S), processes, clock=clock
        )
        self._unknown_patient_reads = RateLimiter.share_of(
            UNKNOWN_PATIENT_READS_PER_S,
            int(UNKNOWN_PATIENT_READS_PER_S),
            processes,
            what="enrollments by patients this node has not seen register",
            clock=clock,
        )
        self._audit = audit
        self._request_window_s = request_window_s
        self._clock = clock
        self._capsules = capsules if capsules is not None else CapsuleCache()
        self._unwrapped = unwrapped if unwrapped is not None else KfragCache()
        self._signing_public_key = keystore.signing_public_key()
        self._delivery_public_key = keystore.delivery_public_key()
        self._account = keystore.eth_address()

    def node_info(self) -> node_pb2.NodeInfo:
        return node_pb2.NodeInfo(
            node_id=self.node_id,
            software_version=SOFTWARE_VERSION,
            signing_public_key=self._signing_public_key,
            signing_algorithm=SIGNING_ALGORITHM,
            delivery_public_key=self._delivery_public_key,
            account=bytes.fromhex(self._account[2:]),
            registry_address=bytes.fromhex(self._registry_address[2:]),
            chain_id=self._chain_id,
            index_block=self._index.index_block(),
        )

    def enroll(
        self, msg: common_pb2.EnrollKeyFragmentRequest
    ) -> common_pb2.EnrollKeyFragmentResponse:
        enrollment = Enrollment.parse(msg)
        if enrollment.node_id != self.node_id:
            raise InvalidRequest(
                f"enrollment is sealed to node {enrollment.node_id!r}; this is {self.node_id!r}"
            )
        authenticate(
            self._domain,
            enrollment.claims(),
            enrollment.signed.signature,
            enrollment.patient,
            now=self._clock(),
            max_window_s=self._request_window_s,
        )
        # A replay, or a patient over her rate, is refused here, before any chain read or
        # HSM call.
        self._limiter.spend(enrollment.patient, cost=ENROLLMENT_COST)
        self._enrollment_nonce(enrollment, spend=False)
        patient = self._registered_patient(enrollment.patient)
        allowed = self._covered_types(
            enrollment.patient, enrollment.grantee, enrollment.receiving_key_bytes
        )
        if not allowed:
            raise PreconditionFailed(
                "no active grant or emergency opt-in from this patient to this grantee names "
                "this receiving key; write the grant first"
            )
        for sealed in enrollment.kfrags:
            if sealed.record_type not in allowed:
                raise AccessDenied(
                    f"the grant does not cover record type {sealed.record_type.label}; "
                    "a kfrag for it is refused"
                )
        # Spent only now that the chain shows a registered patient whose grant names this
        # key (as a request's nonce is spent only once its grant allows), so strangers
        # signing as themselves cannot fill the memory; and before the HSM, so a replay
        # racing this one gets no further. From here on the nonce is used up even if the
        # enrollment fails: the patient retries with a fresh signature, as the SDK does.
        self._enrollment_nonce(enrollment, spend=True)
        now = int(self._clock())
        items = []
        for sealed in enrollment.kfrags:
            clear = self._open_and_verify(enrollment, sealed, patient)
            aad = kfrag_aad(
                self.node_id,
                enrollment.patient,
                enrollment.grantee,
                enrollment.receiving_key_bytes,
                sealed.record_type,
            )
            items.append(
                StoredKfrag(
                    patient=enrollment.patient,
                    grantee=enrollment.grantee,
                    record_type=int(sealed.record_type),
                    wrapped=self._keystore.wrap(clear, aad),
                    kfrag_sha256=hashlib.sha256(clear).digest(),
                    receiving_key=enrollment.receiving_key_bytes,
                    created_at=now,
                    kek_generation=self._keystore.kek_generation(),
                    enrolled_deadline=enrollment.signed.deadline,
                )
            )
            del clear
        # Kfrags for types that no grant or opt-in covers any more (a narrower re-grant)
        # go in the same transaction. The store refuses an enrollment it stored before
        # (whatever the replay memory lost) or older than the one its kfrags came with.
        try:
            self._kfrags.put_enrollment(
                items, nonce=enrollment.signed.nonce, retain_types=allowed, now=now
            )
        except EnrollmentAlreadyStored:
            raise Unauthenticated(ENROLLMENT_REPLAYED) from None
        # This process's unwrapped copies of the replaced (or dropped) kfrags go too; the
        # node's other processes never serve them again either (the cache key holds the
        # wrapped bytes) and forget them within kfrag_cache_ttl_s.
        self._unwrapped.evict(enrollment.patient, enrollment.grantee)
        log.info(
            "kfrag_enrolled",
            patient=enrollment.patient,
            grantee=enrollment.grantee,
            record_types=[RecordType(i.record_type).label for i in items],
            kfrag_sha256=[i.kfrag_sha256.hex() for i in items],
        )
        return common_pb2.EnrollKeyFragmentResponse(
            node_id=self.node_id, kfrag_sha256=[i.kfrag_sha256 for i in items]
        )

    def _registered_patient(self, address: str) -> PatientInfo:
        """The patient's registered keys, read from the chain (the index keeps only who is
        registered, issue 14: keys are needed at enrollment, not on the hot path). A patient
        the index does not know (registered a moment ago, or never) costs a read from a
        node-wide budget (UNKNOWN_PATIENT_READS_PER_S), so that signers who never registered
        cannot make every enrollment a chain read."""
        if not self._index.is_registered(address):
            self._unknown_patient_reads.spend("*")
        patient = self._registry.get_patient(address)
        if patient is None:
            raise PreconditionFailed("patient is not registered in the registry")
        return patient

    def _enrollment_nonce(self, enrollment: Enrollment, *, spend: bool) -> None:
        """Refuse an enrollment whose nonce this node has seen; with ``spend``, use it up."""
        signed = enrollment.signed
        try:
            if spend:
                self._replay.check_and_remember(
                    enrollment.patient, signed.nonce, signed.deadline, self._clock()
                )
            else:
                self._replay.check_unused(enrollment.patient, signed.nonce, self._clock())
        except NonceReused:
            raise Unauthenticated(ENROLLMENT_REPLAYED) from None

    def _covered_types(
        self, patient: str, grantee: str, receiving_key: bytes | None = None
    ) -> frozenset[RecordType]:
        """The record types this node may hold the grantee's kfrags for, by the chain now:
        those of the patient's active grant to the grantee and of her standing emergency
        opt-in for them (one account may hold both); with ``receiving_key``, only those
        that name that key."""
        mask = 0
        grant = self._registry.get_grant(patient, grantee)
        if grant is not None and grant.active:
            if receiving_key is None or grant.grantee_umbral_key == receiving_key:
                mask |= grant.allowed_types_mask
        opt_in = self._registry.get_emergency_opt_in(patient, grantee)
        if opt_in is not None and opt_in.active:
            if receiving_key is None or opt_in.responder_umbral_key == receiving_key:
                mask |= opt_in.allowed_types_mask
        return from_mask(mask)

    def _open_and_verify(
        self, enrollment: Enrollment, sealed: SealedKfrag, patient: PatientInfo
    ) -> bytes:
        """Open a sealed kfrag in the HSM and verify it against the patient's registered key
        for its type and the receiving key; the clear kfrag bytes."""
        binding = delivery_binding(
            self.node_id,
            enrollment.patient,
            enrollment.grantee,
            enrollment.receiving_key_bytes,
            int(sealed.record_type),
        )
        clear = self._keystore.open_delivery(
            sealed.ephemeral_public_key, sealed.sealed, info=binding, aad=binding
        )
        label = sealed.record_type.label
        try:
            load_kfrag(clear, f"{label} kfrag").verify(
                load_public_key(patient.verifying_key, "patient verifying key"),
                load_public_key(patient.umbral_key(sealed.record_type), "patient umbral key"),
                enrollment.receiving_key,
            )
        except (InvalidRequest, VerificationError):
            raise Unauthenticated(
                f"{label} kfrag does not verify against the patient's registered {label} key "
                "and the grant's receiving key"
            ) from None
        return clear

    def shred_revoked(self, events: Sequence[RegistryEvent]) -> None:
        """Crypto-shredding: once a grant is revoked (or an emergency opt-in withdrawn)
        on-chain, destroy this node's kfrags for it, so that not even a restored backup of
        the live node can serve it. Re-granting needs a new enrollment. Kfrags for the types
        a standing emergency opt-in (or a remaining grant) still covers survive."""
        for event in events:
            if not isinstance(event, AccessRevoked | EmergencyOptInChanged):
                continue
            if isinstance(event, EmergencyOptInChanged) and event.active:
                continue
            patient, grantee = (
                event.patient,
                (event.grantee if isinstance(event, AccessRevoked) else event.responder),
            )
            try:
                # Replaying history (at start-up) meets revocations that a later grant
                # superseded: only shred what the chain says nothing covers now.
                covered = self._covered_types(patient, grantee)
                shredded = self._kfrags.delete(patient, grantee, keep_types=covered)
            finally:
                # After the delete: a read that fetched the stored kfrag before it went
                # read the cache's generation before this eviction, so its unwrap is not
                # kept; one that fetches it now finds none. Even if the chain read or the
                # delete failed, this process's unwrapped copies go.
                self._unwrapped.evict(patient, grantee)
            if shredded:
                log.info(
                    "kfrag_shredded",
                    patient=patient,
                    grantee=grantee,
                    kept_types=sorted(t.label for t in covered),
                    block_number=event.block,
                )

    def reencrypt(self, msg: common_pb2.ReencryptionRequest) -> node_pb2.ReencryptResponse:
        """One capsule: a fragment, or the refusal as the RPC's status."""
        judged = self.judge(self.admit_single(msg))
        return self.single_response(judged, self._commit([judged])[0])

    def admit_single(self, msg: common_pb2.ReencryptionRequest) -> list[ReencryptionQuery]:
        """A single read parsed, authenticated and charged to its requester's rate. Its
        capsule is parsed (the costly check, about 0.25 ms) only once its signature is
        found good, as the coordinator does: a forged read costs the signature check."""
        query = ReencryptionQuery.parse(msg, self._domain, self._capsules.load)
        self._authenticate(query)
        parse_capsules([query])
        self._limiter.spend(query.requester)
        return [query]

    def single_response(
        self, judged: JudgedRead, receipts: Sequence[Receipt]
    ) -> node_pb2.ReencryptResponse:
        ((result, receipt, entry),) = zip(judged.results, receipts, judged.entries, strict=True)
        if isinstance(result, KmsError):
            raise result
        return node_pb2.ReencryptResponse(
            fragment=common_pb2.CapsuleFragment(
                node_id=self.node_id, cfrag=result, receipt=_receipt_message(receipt, entry)
            )
        )

    def reencrypt_batch(
        self, msg: common_pb2.ReencryptionBatchRequest
    ) -> node_pb2.ReencryptBatchResponse:
        """Many capsules of one patient for one grantee: one outcome each. The kfrag is
        unwrapped once for the whole batch."""
        judged = self.judge(self.admit_batch(msg))
        return self.batch_response(judged, self._commit([judged])[0])

    def admit_batch(self, msg: common_pb2.ReencryptionBatchRequest) -> Sequence[ReencryptionQuery]:
        """A batch parsed, authenticated and charged to its requester's rate; its capsules
        parsed once its signature is found good (as ``admit_single``)."""
        batch = BatchQuery.parse(msg, self._domain, self._capsules.load)
        self._authenticate(batch.items[0])
        parse_capsules(batch.items)
        self._limiter.spend(batch.items[0].requester, cost=request_cost(len(batch.items)))
        return batch.items

    def batch_response(
        self, judged: JudgedRead, receipts: Sequence[Receipt]
    ) -> node_pb2.ReencryptBatchResponse:
        outcomes = []
        for query, result, receipt, entry in zip(
            judged.queries, judged.results, receipts, judged.entries, strict=True
        ):
            signed = _receipt_message(receipt, entry)
            if isinstance(result, KmsError):
                outcome = common_pb2.CapsuleOutcome(
                    record_id=query.record_id,
                    status=result.grpc_status,
                    reason=result.message,
                    receipt=signed,
                )
            else:
                fragment = common_pb2.CapsuleFragment(
                    node_id=self.node_id, cfrag=result, receipt=signed
                )
                outcome = common_pb2.CapsuleOutcome(
                    record_id=query.record_id, fragment=fragment, receipt=signed
                )
            outcomes.append(outcome)
        return node_pb2.ReencryptBatchResponse(outcomes=outcomes)

    def reencrypt_many(self, msg: node_pb2.ReencryptManyRequest) -> node_pb2.ReencryptManyResponse:
        """Several independently signed reads in one call (ADR 16): each judged exactly
        as if it came alone (same checks, rate limits, replay memory, audit entries and
        receipts), its refusal its own; the audit entries of the whole call are made
        durable in one commit before any answer leaves. Only a failure of that commit
        (audit fails closed) fails the call as a whole."""
        admitted = self.admit_many(msg)
        judged = [r if isinstance(r, KmsError) else self._judge_read(r) for r in admitted]
        served = [j for j in judged if isinstance(j, JudgedRead)]
        return self.many_response(msg, judged, self._commit(served))

    def admit_many(
        self, msg: node_pb2.ReencryptManyRequest
    ) -> list[Sequence[ReencryptionQuery] | KmsError]:
        """Each read of a ReencryptMany call admitted as if it came alone (admit_single,
        admit_batch), or its refusal. The call as a whole is refused if it is too large."""
        reads = msg.reads
        if not 1 <= len(reads) <= MAX_MANY_READS:
            raise InvalidRequest(f"a call holds 1 to {MAX_MANY_READS} reads, got {len(reads)}")
        capsules = sum(len(r.batch.capsules) if r.HasField("batch") else 1 for r in reads)
        if capsules > MAX_BATCH:
            raise InvalidRequest(
                f"a call holds at most {MAX_BATCH} capsules in all, got {capsules}"
            )
        admitted: list[Sequence[ReencryptionQuery] | KmsError] = []
        for i, read in enumerate(reads):
            kind = read.WhichOneof("read")
            try:
                if kind == "single":
                    admitted.append(self.admit_single(read.single))
                elif kind == "batch":
                    admitted.append(self.admit_batch(read.batch))
                else:
                    admitted.append(InvalidRequest(f"reads[{i}] holds no request"))
            except KmsError as e:
                admitted.append(e)
        return admitted

    def _judge_read(self, queries: Sequence[ReencryptionQuery]) -> JudgedRead | KmsError:
        try:
            return self.judge(queries)
        except KmsError as e:
            return e

    def many_response(
        self,
        msg: node_pb2.ReencryptManyRequest,
        judged: Sequence[JudgedRead | KmsError],
        receipts: Sequence[Sequence[Receipt]],
    ) -> node_pb2.ReencryptManyResponse:
        """The call's answer: each read's outcome; ``receipts`` are those of the reads
        judged, in order."""
        served = iter(receipts)
        results = []
        for read, j in zip(msg.reads, judged, strict=True):
            try:
                if isinstance(j, KmsError):
                    raise j
                if read.HasField("single"):
                    single = self.single_response(j, next(served))
                    results.append(node_pb2.NodeReadResult(single=single))
                else:
                    batch = self.batch_response(j, next(served))
                    results.append(node_pb2.NodeReadResult(batch=batch))
            except KmsError as e:
                refusal = node_pb2.ReadRefusal(status=e.grpc_status, message=e.message)
                results.append(node_pb2.NodeReadResult(refusal=refusal))
        return node_pb2.ReencryptManyResponse(results=results)

    def _authenticate(self, query: ReencryptionQuery) -> None:
        """The signer must be the requester named, and the request fresh (EIP-712). The
        digest is the one parsing derived the request id from (a batch's, for its items)."""
        authenticate_digest(
            query.digest,
            query.signed.deadline,
            query.signed.signature,
            query.requester,
            now=self._clock(),
            max_window_s=self._request_window_s,
        )

    def _decide(self, query: ReencryptionQuery, chain_ok: bool) -> Decision:
        # The hot path judges by the local grant index (fresh within its bound, or it
        # raises UNAVAILABLE). The index may lag the chain by up to that bound, so a
        # refusal the chain could already have lifted (a grant written a moment ago) is
        # confirmed against the chain itself. Refusals cost no chain read when nothing
        # newer could lift them: a final one (a deactivated record, a retired or
        # mismatched capsule), or one for a requester this node holds no kfrag of the
        # patient's for, whom it could not serve anyway (strangers, throw-away keys);
        # except that a record the index does not know yet (anchored a moment ago) is
        # looked up within a node-wide budget, so that its refusal names the real
        # reason.
        #
        # Without ``chain_ok``, NeedsChain is raised where the chain would be read, before
        # the unknown-record budget is spent.
        state = self._index.access_state(query.record_id, query.requester, query.capsule_hash)
        decision = judge(query, state, int(self._clock()))
        if not decision.allowed and decision.code not in FINAL_DENIALS:
            holds = self._kfrags.holds(query.patient, query.requester)
            if (holds or decision.code == Reason.RECORD_UNKNOWN) and not chain_ok:
                raise NeedsChain
            if holds or (
                decision.code == Reason.RECORD_UNKNOWN and self._unknown_record_reads.try_spend("*")
            ):
                # Read at the chain's latest block, never from a cache: a cache keyed by
                # the index's block would hide exactly the newer block a confirmation is
                # for.
                state = self._registry.access_state(
                    query.record_id, query.requester, query.capsule_hash
                )
                decision = judge(query, state, int(self._clock()))
        if decision.block_hash is None:
            if not chain_ok:
                raise NeedsChain
            # The audit entry names the block judged at by number and hash.
            block_hash = self._registry.block(decision.block_number).hash
            decision = dataclasses.replace(decision, block_hash=block_hash)
        return decision

    def judge(self, queries: Sequence[ReencryptionQuery], *, chain_ok: bool = True) -> JudgedRead:
        """A cfrag or the refusal for each query of one admitted read, with its audit
        entry (not yet durable: see commit); all share patient, requester and key.

        Without ``chain_ok`` nothing here waits on the network (the local index, the kfrag
        store, the HSM only): a read that needs the chain raises NeedsChain before any side
        effect (its nonce is not spent)."""
        first = queries[0]
        decisions = [self._decide(q, chain_ok) for q in queries]
        # Refusals now; allowed entries are filled in below.
        results: list[bytes | KmsError] = [b"" if d.allowed else d.error() for d in decisions]
        allowed = [i for i, d in enumerate(decisions) if d.allowed]
        if allowed:
            # Only once the grant allows the request is its nonce spent: strangers
            # cannot fill the replay memory with throwaway keys.
            self._replay.check_and_remember(
                first.requester, first.signed.nonce, first.signed.deadline, self._clock()
            )
            # After the deadline check, so an expired request is told so; a replay the
            # memory lost is remembered again on the way.
            self._served_before_start.check(first.request_id, self._clock())
            by_type: dict[RecordType, list[int]] = {}
            for i in allowed:
                by_type.setdefault(queries[i].record_type, []).append(i)
            for record_type, indices in by_type.items():
                self._reencrypt_with(record_type, queries, indices, results)
            for i in allowed:
                if not isinstance(results[i], KmsError):
                    self._capsules.remember(queries[i].capsule_hash, queries[i].capsule)
        now = int(self._clock())
        entries = []
        for query, decision, result in zip(queries, decisions, results, strict=True):
            if isinstance(result, KmsError):
                reason_code = decision.code if not decision.allowed else Reason.NO_KFRAG
                reason, cfrag_hash = result.message, b""
            else:
                reason_code, reason = Reason.GRANTED, decision.reason
                cfrag_hash = hashlib.sha256(result).digest()
            entries.append(
                AuditEntry(
                    request_id=query.request_id,
                    node_id=self.node_id,
                    time=now,
                    requester=query.requester,
                    patient=query.patient,
                    record_id=query.record_id,
                    capsule_hash=query.capsule_hash,
                    purpose_of_use=query.purpose_of_use,
                    decision=DENIED if isinstance(result, KmsError) else GRANTED,
                    reason_code=reason_code,
                    reason=reason,
                    block_number=decision.block_number,
                    block_hash=decision.block_hash or bytes(32),
                    cfrag_hash=cfrag_hash,
                    record_type=query.record_type,
                    requester_umbral_key=query.requester_umbral_key,
                )
            )
        return JudgedRead(queries, results, entries)

    def _commit(self, reads: Sequence[JudgedRead]) -> list[Sequence[Receipt]]:
        """Make the reads' audit entries durable, then charge their refusals; each read's
        receipts. Audit fails closed: every decision is durable in the log before any
        answer leaves; if the append fails, so does the whole call. The entries of a
        call (a batch's, or a ReencryptMany's) share one transaction (one fsync)."""
        if not reads:
            return []
        return self.settle(reads, self._audit.append_many(audit_entries(reads)))

    def settle(
        self, reads: Sequence[JudgedRead], receipts: Sequence[Receipt]
    ) -> list[Sequence[Receipt]]:
        """Once the reads' entries are durable (``receipts``, in order): charge their
        refusals; each read's receipts."""
        answers = []
        offset = 0
        for read in reads:
            own = receipts[offset : offset + len(read.entries)]
            offset += len(read.entries)
            first = read.queries[0]
            refused = sum(1 for r in read.results if isinstance(r, KmsError))
            if refused:
                # A refusal costs the node an audit entry and may cost a chain read.
                self._limiter.charge(first.requester, refused * (REFUSAL_COST - 1))
            if log.is_enabled_for(logging.DEBUG):
                _log_decisions(first, read.entries, own)
            answers.append(own)
        return answers

    def _reencrypt_with(
        self,
        record_type: RecordType,
        queries: Sequence[ReencryptionQuery],
        indices: list[int],
        results: list[bytes | KmsError],
    ) -> None:
        """Re-encrypt the capsules at ``indices`` (all of one record type) with this node's
        kfrag for that type, unwrapped once; a refusal for each if there is none."""
        first = queries[0]
        generation = self._unwrapped.generation()
        stored = self._kfrags.get(first.patient, first.requester, record_type)
        if stored is None or stored.receiving_key != first.requester_umbral_key:
            for i in indices:
                results[i] = PreconditionFailed(
                    f"this node holds no {record_type.label} key fragment for this grant"
                )
            return
        key = (stored.patient, stored.grantee, record_type, stored.wrapped)
        verified = self._unwrapped.get(key)
        if verified is None:
            aad = kfrag_aad(
                self.node_id, stored.patient, stored.grantee, stored.receiving_key, record_type
            )
            # The kfrag was verified at enrollment and is authenticated by AES-GCM
            # since, so re-verifying it here would only cost time.
            clear = self._keystore.unwrap(stored.wrapped, aad, stored.kek_generation)
            verified = umbral.KeyFrag.from_bytes(clear).skip_verification()
            del clear
            self._unwrapped.put(key, verified, generation)
        for i in indices:
            results[i] = bytes(umbral.reencrypt(queries[i].capsule, verified))
        del verified


def audit_entries(reads: Sequence[JudgedRead]) -> list[AuditEntry]:
    """The audit entries of judged reads, in order: what one commit makes durable."""
    return [e for read in reads for e in read.entries]


def _receipt_message(receipt: Receipt, entry: AuditEntry) -> common_pb2.AuditReceipt:
    """The receipt as sent, with what its entry holds that the requester cannot know
    beforehand (``EntryFacts``, from which the SDK rebuilds the entry:
    ``clients.sdk.provider.ReadOfRecord``)."""
    return common_pb2.AuditReceipt(
        node_id=receipt.node_id,
        leaf_index=receipt.leaf_index,
        tree_size=receipt.tree_size,
        entry_hash=receipt.entry_hash,
        signature=receipt.signature,
        batch_start=receipt.batch_start or 0,
        batch_size=receipt.batch_size,
        batch_path=list(receipt.batch_path),
        entry=common_pb2.EntryFacts(
            time=entry.time,
            block_number=entry.block_number,
            block_hash=entry.block_hash,
            reason_code=entry.reason_code,
            reason=entry.reason,
        ),
    )


def _log_decisions(
    first: ReencryptionQuery, entries: Sequence[AuditEntry], receipts: Sequence[Receipt]
) -> None:
    """The debug line for one request. Per-request lines are debug only: the audit log
    holds every decision in full and kms_node_decisions_total counts them, while a line
    per request at info cost about 5% of a node's CPU (py-spy, issue 14)."""
    bound = log.bind(
        request_id=first.request_id,
        patient=first.patient,
        requester=first.requester,
        purpose_of_use=first.purpose_of_use,
    )
    if len(entries) == 1:
        (entry,), (receipt,) = entries, receipts
        bound.debug(
            f"reencrypt_{entry.decision}",
            record_id=entry.record_id.hex(),
            reason=entry.reason_code,
            block_number=entry.block_number,
            audit_index=receipt.leaf_index,
            cfrag_sha256=entry.cfrag_hash.hex() or None,
        )
        return
    reasons: dict[str, int] = {}
    for entry in entries:
        reasons[entry.reason_code] = reasons.get(entry.reason_code, 0) + 1
    bound.debug(
        "reencrypt_batch",
        capsules=len(entries),
        reasons=reasons,
        block_number=entries[0].block_number,
        audit_indexes=[receipts[0].leaf_index, receipts[-1].leaf_index],
    )
