"""The coordinator's gRPC service: the methods it answers apps with.

A read (Reencrypt, ReencryptBatch) is checked and admitted here (admission.py),
fanned out to the nodes (fan_out.py) and answered with each capsule's fragments or the
reason it has none. The fragments are relayed unverified (unless
``verify_every_fragment``) and kept briefly (relayed_reads.py): the app verifies them,
and reports bad ones with RetryReencrypt, which verifies what it reports, takes a lying
node out of rotation and answers with verified replacements (ADR 14). Enrollments are
relayed to the nodes they are sealed to. It holds no keys and cannot open anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
import structlog

from coordinator import metrics
from coordinator.admission import Admission, Ticket, peer_address
from coordinator.call_coalescer import CoalescingClient
from coordinator.cfrag_verifier import CfragVerifier
from coordinator.fan_out import ShareCollection, as_batch_response, fan_out, rotation_changed
from coordinator.node_connections import NodeClient, NodeClientFactory, RoundRobin
from coordinator.node_pool import NodePool
from coordinator.patient_keys import PatientKeyCache, PatientReader
from coordinator.relayed_reads import (
    READ_ID_BYTES,
    Ask,
    RelayedCapsule,
    RelayedRead,
    RelayedReads,
)
from coordinator.settings import CoordinatorSettings
from coordinator.stale_nodes import StaleNodes
from coordinator.threshold import DECISION_STATUSES, FragmentCollector
from core.capsule_cache import CapsuleCache
from core.errors import (
    InsufficientFragments,
    InvalidRequest,
    KmsError,
    PreconditionFailed,
    ResourceExhausted,
)
from core.rate_limit import ENROLLMENT_COST, request_cost
from core.registry_types import PatientInfo
from core.request_auth import Domain, authenticate_digest, signing_digest
from core.requests import BatchQuery, Enrollment, ReencryptionQuery, parse_capsules
from core.umbral_codec import cfrag_precursor, load_cfrag
from proto import rpc
from proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2

log = structlog.get_logger("medkms.coordinator")

#: how long a caller refused for its rate (RESOURCE_EXHAUSTED) waits for that answer
THROTTLED_ANSWER_DELAY_S = 1.0
#: how long a cluster status round waits for each node
STATUS_TIMEOUT_S = 1.0
#: how long a failed read of the registry's signing domain stands as the answer
DOMAIN_RETRY_S = 1.0

#: a capsule's fragments, or why it has none
Outcome = list[common_pb2.CapsuleFragment] | KmsError


class SignedDigest(NamedTuple):
    """What admission checks of a signed request: the EIP-712 digest of its claims
    (computed once, as the request was parsed), the deadline it covers, the signature."""

    digest: bytes
    deadline: int
    signature: bytes


class CoordinatorService:
    def __init__(
        self,
        settings: CoordinatorSettings,
        registry: PatientReader,
        connect: NodeClientFactory,
        *,
        pool: NodePool | None = None,
    ) -> None:
        """``connect`` opens a connection to a node (``connections_per_node`` are opened to
        each, now: make the service inside the running event loop). ``pool`` is which
        nodes to ask first and when to hedge; by default it starts knowing nothing."""
        self._settings = settings
        self._patients = PatientKeyCache(registry, settings.patient_cache_s)
        if pool is None:
            pool = NodePool(
                [n.node_id for n in settings.nodes], max_hedge_s=settings.node_timeout_s / 4
            )
        self._pool = pool
        self._registry = registry
        self._domain: Domain | None = None
        #: one chain read for the domain at a time; after a failure, its error is the
        #: answer until DOMAIN_RETRY_S have passed
        self._domain_lock = asyncio.Lock()
        self._domain_failure: tuple[float, KmsError] | None = None
        self._admission = Admission(
            requester_rate_per_s=settings.requester_rate_per_s,
            requester_burst=settings.requester_burst,
            peer_refusals_per_s=settings.peer_refusals_per_s,
            peer_refusal_burst=settings.peer_refusal_burst,
            served_memory_s=settings.served_memory_s,
        )
        # Reads meeting at a connection while a call is in flight go together (ADR 16).
        coalesce = settings.coalesce_node_calls
        self._nodes = {
            node.node_id: RoundRobin(
                [
                    CoalescingClient(connect(node)) if coalesce else connect(node)
                    for _ in range(settings.connections_per_node)
                ]
            )
            for node in settings.nodes
        }
        self._status_round: asyncio.Future[coordinator_pb2.ClusterStatus] | None = None
        self._relayed = RelayedReads()
        #: nodes found holding an earlier kfrag set of a grant, asked last for it
        self._stale_nodes = StaleNodes()
        #: capsules of reads served, parsed (and their proofs checked) once: the nodes
        #: judged them the anchored ones; a stranger's are parsed every time (ADR 13)
        self._capsules = CapsuleCache()

    async def _signing_domain(self) -> Domain:
        """The registry's EIP-712 domain, which request ids are derived in: read from the
        chain on first use (so the coordinator starts without it), then kept. Until it
        is read, calls wait for one read rather than each making its own, and a failed
        read is the answer for DOMAIN_RETRY_S: with the chain down, a flood of forged
        requests costs no chain read each."""
        if self._domain is not None:
            return self._domain
        async with self._domain_lock:
            if self._domain is None:
                failure = self._domain_failure
                if failure is not None and time.monotonic() < failure[0] + DOMAIN_RETRY_S:
                    raise failure[1]
                try:
                    self._domain = await asyncio.to_thread(self._registry.signing_domain)
                except KmsError as e:
                    self._domain_failure = (time.monotonic(), e)
                    raise
        return self._domain

    async def cluster_info(
        self, _msg: coordinator_pb2.GetClusterInfoRequest, _ctx: Any
    ) -> coordinator_pb2.ClusterInfo:
        return coordinator_pb2.ClusterInfo(
            threshold=self._settings.threshold,
            nodes=[
                coordinator_pb2.NodeEndpoint(node_id=n.node_id, address=n.address)
                for n in self._settings.nodes
            ],
        )

    async def cluster_status(
        self, _msg: coordinator_pb2.GetClusterStatusRequest, _ctx: Any
    ) -> coordinator_pb2.ClusterStatus:
        """Ask every node for its info now (concurrently, within STATUS_TIMEOUT_S); calls
        that arrive while a round is under way share it, so polling apps cost the nodes one
        round at a time, however many they are. A caller's deadline ends its own wait
        (gRPC cancels its call), never the shared round."""
        if self._status_round is None or self._status_round.done():
            self._status_round = asyncio.ensure_future(self._ask_every_node(STATUS_TIMEOUT_S))
        return await asyncio.shield(self._status_round)

    async def _ask_every_node(self, timeout: float) -> coordinator_pb2.ClusterStatus:
        async def ask(node_id: str) -> coordinator_pb2.NodeStatus:
            try:
                info = (
                    await self._nodes[node_id]
                    .next()
                    .GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=timeout)
                )
            except grpc.RpcError as e:
                error = rpc.error_from_rpc(e)
                return coordinator_pb2.NodeStatus(
                    node_id=node_id, status=error.grpc_status, reason=error.message
                )
            return coordinator_pb2.NodeStatus(node_id=node_id, index_block=info.index_block)

        nodes = await asyncio.gather(*(ask(n.node_id) for n in self._settings.nodes))
        return coordinator_pb2.ClusterStatus(nodes=nodes)

    async def enroll_key_fragments(
        self,
        msg: coordinator_pb2.RelayEnrollmentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.RelayEnrollmentsResponse:
        """Relay each sealed enrollment to the node it is sealed to, concurrently. The
        kfrags are sealed to the nodes' HSM keys and the enrollment signed by the patient:
        the coordinator can neither read nor alter them undetected."""
        if not 1 <= len(msg.enrollments) <= len(self._settings.nodes):
            raise InvalidRequest(
                f"send 1 to {len(self._settings.nodes)} enrollments (one per node), "
                f"got {len(msg.enrollments)}"
            )
        node_ids = [e.node_id for e in msg.enrollments]
        if len(set(node_ids)) != len(node_ids):
            raise InvalidRequest("at most one enrollment per node")
        msg.DiscardUnknownFields()  # as in reencrypt
        unknown = [n for n in node_ids if n not in self._nodes]
        if unknown:
            shown = ", ".join(repr(n[:32]) for n in unknown)
            raise InvalidRequest(f"unknown node ids: {shown}")
        parsed = [Enrollment.parse(e) for e in msg.enrollments]
        patient = parsed[0].patient
        if any(e.patient != patient for e in parsed):
            raise InvalidRequest("every enrollment of one relay must be the same patient's")
        # Signed by the patient (checked here as at every node), and charged to her budget
        # once per relay, as one refusal if every node refuses it.
        domain = await self._signing_domain()
        ticket, _ = await self._admit(
            [
                SignedDigest(
                    signing_digest(domain, e.claims()), e.signed.deadline, e.signed.signature
                )
                for e in parsed
            ],
            patient,
            patient,
            ENROLLMENT_COST,
            context,
            who="patient",
        )
        timeout = self._timeout(context)

        async def relay(
            enrollment: common_pb2.EnrollKeyFragmentRequest,
        ) -> coordinator_pb2.RelayedEnrollment:
            node_id = enrollment.node_id
            try:
                response = (
                    await self._nodes[node_id].next().EnrollKeyFragment(enrollment, timeout=timeout)
                )
            except grpc.RpcError as e:
                error = rpc.error_from_rpc(e)
                return coordinator_pb2.RelayedEnrollment(
                    node_id=node_id, status=error.grpc_status, reason=error.message
                )
            return coordinator_pb2.RelayedEnrollment(node_id=node_id, response=response)

        results = await asyncio.gather(*(relay(e) for e in msg.enrollments))
        for enrollment, result in zip(parsed, results, strict=True):
            if not result.status:  # the node holds this grantee's kfrags of hers now
                self._stale_nodes.forget(patient, enrollment.grantee, enrollment.node_id)
        accepted = sum(1 for r in results if not r.status)
        self._settle(ticket, served=accepted, refused=[] if accepted else [results[0].status])
        log.info(
            "enrollments_relayed",
            nodes=node_ids,
            failed=[r.node_id for r in results if r.status],
        )
        return coordinator_pb2.RelayEnrollmentsResponse(results=results)

    def _timeout(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        """Per-node deadline: ours, or less if the caller's deadline is nearer."""
        remaining = context.time_remaining()
        if remaining is None:
            return self._settings.node_timeout_s
        return max(0.001, min(self._settings.node_timeout_s, remaining))

    async def _admit(
        self,
        signed: Sequence[SignedDigest],
        party: str,
        patient: str,
        cost: float,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        who: str = "requester",
    ) -> tuple[Ticket, PatientInfo]:
        """Check that ``party`` signed each digest, fresh (as the nodes will), then its and
        its peer's budgets (admission.py); the admission ticket and the patient's keys."""
        now = time.time()
        for digest, deadline, signature in signed:
            authenticate_digest(
                digest,
                deadline,
                signature,
                party,
                now=now,
                max_window_s=self._settings.request_window_s,
                who=who,
            )
        peer = peer_address(context.peer() or "")
        try:
            ticket = self._admission.admit(party, peer, cost)
        except ResourceExhausted:
            # Answer a throttled caller only after a while (an asyncio sleep costs nothing):
            # a flooder with a fixed number of calls in flight is slowed to that many per
            # THROTTLED_ANSWER_DELAY_S, instead of costing the coordinator a fast refusal
            # each. The caller's deadline still ends the wait.
            remaining = context.time_remaining()
            delay = THROTTLED_ANSWER_DELAY_S
            if remaining is not None:
                delay = min(delay, max(0.0, remaining - 0.05))
            await asyncio.sleep(delay)
            raise
        try:
            info = await self._patients.get(patient)
        except PreconditionFailed:
            self._admission.settle(ticket, served=0, refused=1)
            raise
        return ticket, info

    def _settle(self, ticket: Ticket, *, served: int, refused: list[str]) -> None:
        """Settle the ticket: capsules served, and those the nodes refused for the
        requester's own reasons (not for being down)."""
        count = sum(1 for status in refused if status in DECISION_STATUSES)
        self._admission.settle(ticket, served=served, refused=count)

    async def reencrypt(
        self, msg: common_pb2.ReencryptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        """One capsule, served as a batch of one; the nodes are sent the request as signed."""
        # Fields this version does not know are dropped before anything is forwarded: the
        # nodes are sent what was checked and signed, and a read padded with them cannot
        # make a node call it shares with other reads (call_coalescer.py) too large to send.
        msg.DiscardUnknownFields()
        query = ReencryptionQuery.parse(msg, await self._signing_domain(), self._capsules.load)
        # Sent on as signed (the message is this call's own, not copied), with the id the
        # nodes derive too, echoed so that each checks it: the nodes' audit entries and
        # these logs carry the id the app was given.
        msg.request_id = query.request_id

        async def ask(node: NodeClient, timeout: float) -> node_pb2.ReencryptBatchResponse:
            response = await node.Reencrypt(msg, timeout=timeout)
            return as_batch_response(query.record_id, response)

        collection, (outcome,), read_id = await self._read([query], ask, context)
        collector = collection.collectors[query.record_id]
        bound = log.bind(request_id=query.request_id, record_id=query.record_id.hex())
        self._log_failures(bound, collector)
        if isinstance(outcome, KmsError):
            bound.info("reencrypt_failed", status=outcome.grpc_status, valid=len(collector.valid))
            raise outcome
        bound.info("reencrypt_served", nodes=[f.node_id for f in outcome])
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=outcome, threshold=self._settings.threshold, read_id=read_id
        )

    async def reencrypt_batch(
        self, msg: common_pb2.ReencryptionBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorBatchResponse:
        msg.DiscardUnknownFields()  # as in reencrypt
        batch = BatchQuery.parse(msg, await self._signing_domain(), self._capsules.load)
        msg.request_id = batch.request_id  # as for a single read

        async def ask(node: NodeClient, timeout: float) -> node_pb2.ReencryptBatchResponse:
            return await node.ReencryptBatch(msg, timeout=timeout)

        _, outcomes, read_id = await self._read(batch.items, ask, context)
        results = [
            _capsule_result(query.record_id, outcome)
            for query, outcome in zip(batch.items, outcomes, strict=True)
        ]
        served = sum(1 for r in results if not r.status)
        log.info(
            "reencrypt_batch_served",
            request_id=batch.request_id,
            capsules=len(batch.items),
            served=served,
            refused=len(results) - served,
        )
        return coordinator_pb2.CoordinatorBatchResponse(
            results=results, threshold=self._settings.threshold, read_id=read_id
        )

    async def _read(
        self,
        queries: Sequence[ReencryptionQuery],
        ask: Ask,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[ShareCollection, list[Outcome], bytes]:
        """Serve the capsules of one signed read (a single is a batch of one): admit the
        requester, ask the nodes, and settle the admission with what was served. Each
        capsule's outcome, in order, and the read id it is kept under (empty if none).
        The capsules of those served are kept parsed, for the next read of them."""
        first = queries[0]
        ticket, patient = await self._admit(
            [SignedDigest(first.digest, first.signed.deadline, first.signed.signature)],
            first.requester,
            first.patient,
            request_cost(len(queries)),
            context,
        )
        # Capsules are parsed only now (about 0.25 ms each): a read whose signature or
        # budget fails costs no more than its signature check, however many it carries.
        try:
            parse_capsules(queries)
        except InvalidRequest:
            self._admission.settle(ticket, served=0, refused=1)
            raise
        timeout = self._timeout(context)
        verifiers = {q.record_id: CfragVerifier(q, patient) for q in queries}
        collection = ShareCollection(
            {q.record_id: self._settings.threshold for q in queries},
            self._pool.node_ids,
            verifiers,
            self._verifies,
            lambda node_id, record_id: self._lied(node_id, first.request_id, record_id),
        )
        stale = self._stale_nodes.avoided(first.patient, first.requester, time.monotonic())
        await fan_out(
            self._pool, self._nodes, lambda node: ask(node, timeout), collection, last=stale
        )
        outcomes = [collection.outcome(q.record_id) for q in queries]
        refused = [o.grpc_status for o in outcomes if isinstance(o, KmsError)]
        self._settle(ticket, served=len(outcomes) - len(refused), refused=refused)
        relayed = {
            q.record_id: RelayedCapsule(verifiers[q.record_id], {f.node_id: f for f in o})
            for q, o in zip(queries, outcomes, strict=True)
            if not isinstance(o, KmsError)
        }
        for query in queries:
            if query.record_id in relayed:
                self._capsules.remember(query.capsule_hash, query.capsule)
        read_id = b""
        if relayed and not self._settings.verify_every_fragment:
            read = RelayedRead(
                ticket=ticket,
                request_id=first.request_id,
                patient=first.patient,
                capsules=relayed,
                asked=frozenset(collection.asked),
                ask=ask,
                record_ids=tuple(q.record_id for q in queries),
            )
            read_id = self._relayed.keep(read, time.monotonic())
        return collection, outcomes, read_id

    def _lied(self, node_id: str, request_id: str, record_id: bytes) -> None:
        """A fragment from ``node_id`` was found not to verify: reported by an app and
        checked, or checked before relaying (a suspected node's, a replacement, or
        ``verify_every_fragment``). The node is named, counted and taken out of rotation
        as suspected (ADR 14)."""
        metrics.LYING_FRAGMENTS.labels(node=node_id).inc()
        log.warning("node_lied", node_id=node_id, request_id=request_id, record_id=record_id.hex())
        rotation_changed(node_id, self._pool.lied(node_id, time.monotonic()))

    def _stale(self, node_id: str, read: RelayedRead, record_id: bytes) -> None:
        """A fragment from ``node_id`` verified but was of another kfrag set than ``m``
        others of the same capsule: its node missed the patient's last enrollment (a
        re-grant that did not reach it), or replays an earlier set. It cannot serve the
        grant, so it is named and counted, and asked last for this grant's reads
        (stale_nodes.py), but not suspected: the patient decides which nodes get which
        set, so suspecting would let her (or a re-grant a node was down for) get honest
        nodes taken out of rotation for everyone (ADR 14, amended)."""
        metrics.STALE_FRAGMENTS.labels(node=node_id).inc()
        self._stale_nodes.mark(read.patient, read.ticket.requester, node_id, time.monotonic())
        log.warning(
            "node_stale_fragment",
            node_id=node_id,
            request_id=read.request_id,
            record_id=record_id.hex(),
            why="its fragment is of another kfrag set than the other nodes': the node "
            "missed the patient's last enrollment, or replays an earlier set",
        )

    def _verifies(self, node_id: str) -> bool:
        """Whether a fragment from ``node_id`` is verified before it is relayed."""
        return self._settings.verify_every_fragment or self._pool.suspect(node_id, time.monotonic())

    async def retry_reencrypt(
        self, msg: coordinator_pb2.RetryReadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        """A single read's reported fragments checked and replaced (:meth:`_retry`)."""
        ((_, outcome),) = await self._retry(msg, context, batch=False)
        if isinstance(outcome, KmsError):
            raise outcome
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=outcome, threshold=self._settings.threshold
        )

    async def retry_reencrypt_batch(
        self, msg: coordinator_pb2.RetryReadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorBatchResponse:
        """A batch's reported capsules, each with its fragments or why it has none: only
        the capsules reported, in the read's order."""
        outcomes = await self._retry(msg, context, batch=True)
        return coordinator_pb2.CoordinatorBatchResponse(
            results=[_capsule_result(r, o) for r, o in outcomes],
            threshold=self._settings.threshold,
        )

    async def _retry(
        self,
        msg: coordinator_pb2.RetryReadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        batch: bool,
    ) -> list[tuple[bytes, Outcome]]:
        """Check the reported fragments of a kept read (ADR 14). Each one that does not
        verify takes its node out of rotation (``node_lied``, counted per node) and is
        replaced by a verified fragment from a node not yet asked. A record reported
        inconsistent (its fragments verify but do not combine) is settled by
        :meth:`_agree`. If any reported fragment verifies, or an inconsistent record's
        fragments are of one kfrag set, the report is false: charged to the read's
        requester as that many refusals, and refused, with no replacements. The read is
        retried once."""
        read_id = bytes(msg.read_id)
        if len(read_id) != READ_ID_BYTES:
            raise InvalidRequest(f"read_id must be {READ_ID_BYTES} bytes, as answered")
        read = self._relayed.peek(read_id, time.monotonic())
        if read is None:
            raise PreconditionFailed(
                "no read is kept under this read_id: unknown, already retried, or older "
                f"than {self._relayed.keep_s:g} s; send the read again"
            )
        reported = _reported(msg, read)
        inconsistent = _inconsistent(msg, read)
        if not reported and not inconsistent:
            raise InvalidRequest("report at least one fragment or inconsistent record")
        if not batch and len(set(reported) | set(inconsistent)) > 1:
            raise InvalidRequest(
                "fragments of several records are reported with RetryReencryptBatch"
            )
        self._relayed.take(read_id, time.monotonic())
        lied: dict[bytes, list[str]] = {}
        false: list[str] = []  # nodes whose reported fragment verifies
        one_set: list[bytes] = []  # records reported inconsistent whose fragments agree
        for record_id, node_ids in reported.items():
            capsule = read.capsules[record_id]
            for node_id in node_ids:
                if capsule.verifier.check(bytes(capsule.fragments[node_id].cfrag)):
                    false.append(node_id)
                else:
                    lied.setdefault(record_id, []).append(node_id)
        # record id -> kfrag set (precursor) -> the nodes whose verified fragments are of it
        sets: dict[bytes, dict[bytes, list[str]]] = {}
        for record_id in inconsistent:
            capsule = read.capsules[record_id]
            by_set: dict[bytes, list[str]] = {}
            for node_id, fragment in capsule.fragments.items():
                if node_id in lied.get(record_id, ()):
                    continue
                cfrag = bytes(fragment.cfrag)
                if capsule.verifier.check(cfrag):
                    by_set.setdefault(cfrag_precursor(load_cfrag(cfrag)), []).append(node_id)
                elif node_id not in lied.setdefault(record_id, []):
                    lied[record_id].append(node_id)
            if len(by_set) > 1:
                sets[record_id] = by_set
            else:
                one_set.append(record_id)
        for record_id, node_ids in lied.items():
            for node_id in node_ids:
                self._lied(node_id, read.request_id, record_id)
        if false or one_set:
            claims = len(false) + len(one_set)
            metrics.FALSE_REPORTS.inc(claims)
            self._admission.charge_refusals(read.ticket, claims)
            log.warning(
                "false_report",
                requester=read.ticket.requester,
                request_id=read.request_id,
                nodes=false,
                records=[r.hex() for r in one_set],
            )
            why = [f"the fragment from {n} verifies" for n in false]
            why += [f"the fragments of record 0x{r.hex()} are of one kfrag set" for r in one_set]
            raise InvalidRequest(
                f"a false report ({'; '.join(why)}), charged to the requester as refused requests"
            )
        timeout = self._timeout(context)
        outcomes = dict(await self._agree(read, sets, lied, timeout)) if sets else {}
        rest = {r: nodes for r, nodes in lied.items() if r not in sets}
        if rest:
            outcomes.update(await self._replace(read, rest, timeout))
        return [(r, outcomes[r]) for r in read.record_ids if r in outcomes]

    async def _agree(
        self,
        read: RelayedRead,
        sets: dict[bytes, dict[bytes, list[str]]],
        lied: dict[bytes, list[str]],
        timeout: float,
    ) -> list[tuple[bytes, Outcome]]:
        """Each capsule of ``sets`` (relayed fragments that verify but come from different
        kfrag sets): every node the read did not ask is asked too, its fragment verified,
        and the set that the most nodes' fragments are of, if ``m`` of them, answers.
        Fragments of any other set cannot combine with it: their nodes (a node that
        missed the patient's last enrollment, or replays an earlier set) are named and
        counted (``node_stale_fragment``), not suspected."""
        m = self._settings.threshold
        candidates = [n for n in self._pool.node_ids if n not in read.asked]
        collection = None
        if candidates:
            collection = await self._ask_unasked(
                read, {r: len(candidates) for r in sets}, candidates, timeout
            )
        outcomes: list[tuple[bytes, Outcome]] = []
        for record_id, by_set in sets.items():
            liars = lied.get(record_id, [])
            fragments = {
                n: f for n, f in read.capsules[record_id].fragments.items() if n not in liars
            }
            groups = {precursor: list(nodes) for precursor, nodes in by_set.items()}
            for fragment in collection.valid(record_id) if collection else []:
                fragments[fragment.node_id] = fragment
                precursor = cfrag_precursor(load_cfrag(bytes(fragment.cfrag)))
                groups.setdefault(precursor, []).append(fragment.node_id)
            agreed = max(groups.values(), key=len)
            if len(agreed) < m:
                sizes = ", ".join(str(len(nodes)) for nodes in groups.values())
                outcomes.append(
                    (
                        record_id,
                        InsufficientFragments(
                            f"the nodes' fragments come from {len(groups)} kfrag sets "
                            f"({sizes} nodes): no {m} of them agree"
                        ),
                    )
                )
                continue
            for nodes in groups.values():
                if nodes is not agreed:
                    for node_id in nodes:
                        self._stale(node_id, read, record_id)
            outcomes.append((record_id, [fragments[n] for n in agreed[:m]]))
        log.info(
            "reencrypt_agreed",
            request_id=read.request_id,
            records=[r.hex() for r in sets],
        )
        return outcomes

    async def _replace(
        self, read: RelayedRead, lied: dict[bytes, list[str]], timeout: float
    ) -> list[tuple[bytes, Outcome]]:
        """Each capsule of ``lied``: its honest relayed fragments and verified
        replacements for those of the liars, from nodes the read did not ask."""
        candidates = [n for n in self._pool.node_ids if n not in read.asked]
        needed = {r: len(nodes) for r, nodes in lied.items()}
        replacements: dict[bytes, Outcome] = {}
        if max(needed.values()) > len(candidates):
            for record_id in lied:
                replacements[record_id] = InsufficientFragments(
                    f"{needed[record_id]} replacement fragments needed but only "
                    f"{len(candidates)} nodes were not asked already"
                )
        else:
            collection = await self._ask_unasked(read, needed, candidates, timeout)
            replacements = {r: collection.outcome(r) for r in lied}
        outcomes: list[tuple[bytes, Outcome]] = []
        for record_id in read.record_ids:
            if record_id not in lied:
                continue
            replaced = replacements[record_id]
            if isinstance(replaced, KmsError):
                outcomes.append((record_id, replaced))
                continue
            honest = [
                f for n, f in read.capsules[record_id].fragments.items() if n not in lied[record_id]
            ]
            outcomes.append((record_id, honest + replaced))
        log.info(
            "reencrypt_retried",
            request_id=read.request_id,
            replaced={r.hex(): [f.node_id for f in o] for r, o in outcomes if isinstance(o, list)},
        )
        return outcomes

    async def _ask_unasked(
        self, read: RelayedRead, needed: dict[bytes, int], candidates: list[str], timeout: float
    ) -> ShareCollection:
        """``needed`` verified fragments of each capsule from ``candidates``, nodes the
        read had not asked (a node refuses a signed request it has seen); a fragment that
        does not verify is a lie caught."""
        collection = ShareCollection(
            needed,
            candidates,
            {r: read.capsules[r].verifier for r in needed},
            lambda _node_id: True,
            lambda node_id, record_id: self._lied(node_id, read.request_id, record_id),
        )
        await fan_out(
            self._pool,
            self._nodes,
            lambda node: read.ask(node, timeout),
            collection,
            exclude=read.asked,
        )
        return collection

    @staticmethod
    def _log_failures(bound: Any, collector: FragmentCollector) -> None:
        for failure in collector.failures:
            bound.info("node_failed", node_id=failure.node_id, status=failure.status)


def _capsule_result(record_id: bytes, outcome: Outcome) -> coordinator_pb2.CapsuleFragments:
    if isinstance(outcome, KmsError):
        return coordinator_pb2.CapsuleFragments(
            record_id=record_id, status=outcome.grpc_status, reason=outcome.message
        )
    return coordinator_pb2.CapsuleFragments(record_id=record_id, fragments=outcome)


def _record_named(raw: bytes, read: RelayedRead) -> bytes:
    """The record a report names: its id, or (empty) a single read's capsule."""
    record_id = bytes(raw)
    if not record_id and len(read.record_ids) == 1:
        return read.record_ids[0]
    return record_id


def _reported(msg: coordinator_pb2.RetryReadRequest, read: RelayedRead) -> dict[bytes, list[str]]:
    """The reported fragments, by record id (an empty one names a single read's capsule):
    each must be one the read relayed."""
    reported: dict[bytes, list[str]] = {}
    for fragment in msg.reported:
        record_id = _record_named(fragment.record_id, read)
        capsule = read.capsules.get(record_id)
        if capsule is None or fragment.node_id not in capsule.fragments:
            raise InvalidRequest(
                f"no fragment from {fragment.node_id[:32]!r} for record "
                f"0x{record_id.hex()[:64]} was relayed in this read"
            )
        nodes = reported.setdefault(record_id, [])
        if fragment.node_id not in nodes:
            nodes.append(fragment.node_id)
    return reported


def _inconsistent(msg: coordinator_pb2.RetryReadRequest, read: RelayedRead) -> list[bytes]:
    """The records reported inconsistent (an empty id names a single read's capsule), in
    the read's order: each must be one the read relayed."""
    named = set()
    for raw in msg.inconsistent:
        record_id = _record_named(raw, read)
        if record_id not in read.capsules:
            raise InvalidRequest(
                f"record 0x{record_id.hex()[:64]} was not relayed in this read: it cannot be "
                "reported inconsistent"
            )
        named.add(record_id)
    return [r for r in read.record_ids if r in named]
