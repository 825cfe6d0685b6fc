"""The coordinator's work: ask the best ``threshold`` nodes, verify what comes
back, replace failed nodes and hedge slow ones, and return as soon as
``threshold`` valid capsule fragments are in (for each capsule of a batch).

It holds no keys and cannot open anything: it relays the grantee's request and
checks each cfrag against the patient's registered keys, so a broken or lying
node cannot make the grantee's decryption fail.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import structlog

from coordinator.admission import Admission, Ticket, peer_address
from coordinator.node_pool import NodePool
from coordinator.settings import CoordinatorSettings
from coordinator.threshold import DECISION_STATUSES, FragmentCollector
from core.errors import InvalidRequest, KmsError, PreconditionFailed, ResourceExhausted
from core.rate_limit import ENROLLMENT_COST, request_cost
from core.registry_types import PatientInfo
from core.request_auth import Claims, Domain, authenticate
from core.requests import BatchQuery, Enrollment, ReencryptionQuery
from core.umbral_codec import VerificationError, load_cfrag, load_public_key
from proto import rpc
from proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2
from proto.stubs import AioNodeStub
from proto.transport import Transport

log = structlog.get_logger("medkms.coordinator")

# A node that comes back must be used again quickly: gRPC's default reconnect
# backoff grows to two minutes, during which calls to that node fail at once.
MAX_RECONNECT_BACKOFF_MS = 1000
NODE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


class PatientReader(Protocol):
    def get_patient(self, address: str) -> PatientInfo | None: ...

    def signing_domain(self) -> Domain: ...


#: an unregistered patient is asked about again after this long (she may register)
UNKNOWN_PATIENT_TTL_S = 5.0
#: most patients remembered; the oldest go first
MAX_PATIENTS = 100_000


class PatientKeyCache:
    """Patients' registered keys, read from the chain at most once per TTL. Unknown
    patients are remembered too (for a few seconds), so requests naming made-up patients
    cost no chain read each; the memory is bounded."""

    def __init__(self, registry: PatientReader, ttl_s: float) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, PatientInfo | None]] = OrderedDict()

    async def get(self, address: str) -> PatientInfo:
        now = time.monotonic()
        hit = self._entries.get(address)
        if hit is not None and now - hit[0] < (self._ttl_s if hit[1] else UNKNOWN_PATIENT_TTL_S):
            info = hit[1]
        else:
            info = await asyncio.to_thread(self._registry.get_patient, address)
            self._entries[address] = (now, info)
            self._entries.move_to_end(address)
            while len(self._entries) > MAX_PATIENTS:
                self._entries.popitem(last=False)
        if info is None:
            raise PreconditionFailed("patient is not registered in the registry")
        return info


class _Verifier:
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


BAD_CFRAG = "returned a capsule fragment that does not verify"
#: how long a caller refused for its rate (RESOURCE_EXHAUSTED) waits for that answer
THROTTLED_ANSWER_DELAY_S = 1.0
#: how long a cluster status round waits for each node
STATUS_TIMEOUT_S = 1.0


class _ShareCollection:
    """The capsule fragments for each capsule of one read, as the nodes answer: each
    verified, and counted toward its capsule's threshold."""

    def __init__(self, threshold: int, node_ids: Sequence[str], verifiers: dict[bytes, _Verifier]):
        self.collectors = {r: FragmentCollector(threshold, node_ids) for r in verifiers}
        self._verifiers = verifiers
        #: (record id, node id) -> the audit receipt that came with the fragment
        self.receipts: dict[tuple[bytes, str], common_pb2.AuditReceipt] = {}

    def _open(self) -> list[FragmentCollector]:
        return [c for c in self.collectors.values() if not (c.complete or c.hopeless)]

    @property
    def finished(self) -> bool:
        return not self._open()

    def more_needed(self, in_flight: int) -> int:
        return max((c.threshold - len(c.valid) - in_flight for c in self._open()), default=0)

    def take(self, node_id: str, response: node_pb2.ReencryptBatchResponse) -> None:
        answered = set()
        for outcome in response.outcomes:
            record_id = bytes(outcome.record_id)
            collector = self.collectors.get(record_id)
            if collector is None or record_id in answered:
                continue  # not asked for, or repeated: ignore rather than trust
            answered.add(record_id)
            if outcome.status:
                collector.reject(node_id, outcome.status, outcome.reason)
            elif self._verifiers[record_id].check(bytes(outcome.fragment.cfrag)):
                collector.accept(node_id, bytes(outcome.fragment.cfrag))
                self.receipts[(record_id, node_id)] = outcome.fragment.receipt
            else:
                collector.reject(node_id, "DATA_LOSS", BAD_CFRAG)
        for record_id, collector in self.collectors.items():
            if record_id not in answered:
                collector.reject(node_id, "DATA_LOSS", "answered without this capsule")

    def fail(self, node_id: str, status: str, message: str) -> None:
        for collector in self.collectors.values():
            collector.reject(node_id, status, message)

    def outcome(self, record_id: bytes) -> list[common_pb2.CapsuleFragment] | KmsError:
        """The capsule's first ``threshold`` valid fragments, or why there are not as many."""
        collector = self.collectors[record_id]
        if not collector.complete:
            return collector.error()
        return [
            common_pb2.CapsuleFragment(node_id=n, cfrag=c, receipt=self.receipts[(record_id, n)])
            for n, c in collector.fragments()
        ]


def _as_batch_response(
    record_id: bytes, response: node_pb2.ReencryptResponse
) -> node_pb2.ReencryptBatchResponse:
    """A node's answer to a single request, as its answer to the batch of one it is."""
    return node_pb2.ReencryptBatchResponse(
        outcomes=[common_pb2.CapsuleOutcome(record_id=record_id, fragment=response.fragment)]
    )


#: asks one node for a read's fragments, within a timeout
_Ask = Callable[[AioNodeStub, float], Awaitable[node_pb2.ReencryptBatchResponse]]


class _RoundRobin:
    """A node's stubs, one per connection, taken in turn."""

    def __init__(self, stubs: list[AioNodeStub]) -> None:
        self._stubs = itertools.cycle(stubs)

    def next(self) -> AioNodeStub:
        return next(self._stubs)


class CoordinatorService:
    def __init__(self, settings: CoordinatorSettings, registry: PatientReader) -> None:
        self._settings = settings
        self._patients = PatientKeyCache(registry, settings.patient_cache_s)
        self._pool = NodePool(
            [n.node_id for n in settings.nodes], max_hedge_s=settings.node_timeout_s / 4
        )
        self._registry = registry
        self._domain: Domain | None = None
        self._admission = Admission(
            requester_rate_per_s=settings.requester_rate_per_s,
            requester_burst=settings.requester_burst,
            peer_refusals_per_s=settings.peer_refusals_per_s,
            peer_refusal_burst=settings.peer_refusal_burst,
            served_memory_s=settings.served_memory_s,
        )
        self._stubs: dict[str, _RoundRobin] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._status_round: asyncio.Future[coordinator_pb2.ClusterStatus] | None = None

    async def _signing_domain(self) -> Domain:
        """The registry's EIP-712 domain, which request ids are derived in: read from the
        chain on first use (so the coordinator starts without it), then kept."""
        if self._domain is None:
            self._domain = await asyncio.to_thread(self._registry.signing_domain)
        return self._domain

    def open_channels(self, transport: Transport) -> None:
        """Create the reusable channels to each node; call inside the running loop.

        Each channel checks that the node's certificate names that node's id, so
        one node cannot answer in another's place even on a shared address."""
        # A local subchannel pool gives each channel its own TCP connection, so that
        # a node's processes (which share its port per connection) all get work.
        options = [*NODE_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        for node in self._settings.nodes:
            stubs = []
            for _ in range(self._settings.connections_per_node):
                channel = transport.aio_channel(
                    node.address, options=options, server_name=node.node_id
                )
                self._channels.append(channel)
                stubs.append(AioNodeStub(channel))
            self._stubs[node.node_id] = _RoundRobin(stubs)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

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
                    await self._stubs[node_id]
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
        unknown = [n for n in node_ids if n not in self._stubs]
        if unknown:
            shown = ", ".join(repr(n[:32]) for n in unknown)
            raise InvalidRequest(f"unknown node ids: {shown}")
        parsed = [Enrollment.parse(e) for e in msg.enrollments]
        patient = parsed[0].patient
        if any(e.patient != patient for e in parsed):
            raise InvalidRequest("every enrollment of one relay must be the same patient's")
        # Signed by the patient (checked here as at every node), and charged to her budget
        # once per relay, as one refusal if every node refuses it.
        ticket, _ = await self._admit(
            [(e.claims(), e.signed.signature) for e in parsed],
            patient,
            patient,
            ENROLLMENT_COST,
            context,
        )
        timeout = self._timeout(context)

        async def relay(
            enrollment: common_pb2.EnrollKeyFragmentRequest,
        ) -> coordinator_pb2.RelayedEnrollment:
            node_id = enrollment.node_id
            try:
                response = (
                    await self._stubs[node_id].next().EnrollKeyFragment(enrollment, timeout=timeout)
                )
            except grpc.RpcError as e:
                error = rpc.error_from_rpc(e)
                return coordinator_pb2.RelayedEnrollment(
                    node_id=node_id, status=error.grpc_status, reason=error.message
                )
            return coordinator_pb2.RelayedEnrollment(node_id=node_id, response=response)

        results = await asyncio.gather(*(relay(e) for e in msg.enrollments))
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
        signed: Sequence[tuple[Claims, bytes]],
        party: str,
        patient: str,
        cost: float,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[Ticket, PatientInfo]:
        """Check that ``party`` signed each of the claims, fresh (as the nodes will), then
        its and its peer's budgets (admission.py); the admission ticket and the patient's
        keys."""
        domain = await self._signing_domain()
        now = time.time()
        for claims, signature in signed:
            authenticate(
                domain,
                claims,
                signature,
                party,
                now=now,
                max_window_s=self._settings.request_window_s,
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
        query = ReencryptionQuery.parse(msg, await self._signing_domain())
        outgoing = common_pb2.ReencryptionRequest()
        outgoing.CopyFrom(msg)
        # The id the nodes derive too, echoed so that each checks it: the nodes' audit
        # entries and these logs carry the id the app was given.
        outgoing.request_id = query.request_id

        async def ask(node: AioNodeStub, timeout: float) -> node_pb2.ReencryptBatchResponse:
            response = await node.Reencrypt(outgoing, timeout=timeout)
            return _as_batch_response(query.record_id, response)

        collection, (outcome,) = await self._read(query.claims(), [query], ask, context)
        collector = collection.collectors[query.record_id]
        bound = log.bind(request_id=query.request_id, record_id=query.record_id.hex())
        self._log_failures(bound, collector)
        if isinstance(outcome, KmsError):
            bound.info("reencrypt_failed", status=outcome.grpc_status, valid=len(collector.valid))
            raise outcome
        bound.info("reencrypt_served", nodes=[f.node_id for f in outcome])
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=outcome, threshold=self._settings.threshold
        )

    async def reencrypt_batch(
        self, msg: common_pb2.ReencryptionBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorBatchResponse:
        batch = BatchQuery.parse(msg, await self._signing_domain())
        outgoing = common_pb2.ReencryptionBatchRequest()
        outgoing.CopyFrom(msg)
        outgoing.request_id = batch.request_id

        async def ask(node: AioNodeStub, timeout: float) -> node_pb2.ReencryptBatchResponse:
            return await node.ReencryptBatch(outgoing, timeout=timeout)

        _, outcomes = await self._read(batch.claims(), batch.items, ask, context)
        results = []
        for query, outcome in zip(batch.items, outcomes, strict=True):
            if isinstance(outcome, KmsError):
                result = coordinator_pb2.CapsuleFragments(
                    record_id=query.record_id, status=outcome.grpc_status, reason=outcome.message
                )
            else:
                result = coordinator_pb2.CapsuleFragments(
                    record_id=query.record_id, fragments=outcome
                )
            results.append(result)
        served = sum(1 for r in results if not r.status)
        log.info(
            "reencrypt_batch_served",
            request_id=batch.request_id,
            capsules=len(batch.items),
            served=served,
            refused=len(results) - served,
        )
        return coordinator_pb2.CoordinatorBatchResponse(
            results=results, threshold=self._settings.threshold
        )

    async def _read(
        self,
        claims: Claims,
        queries: Sequence[ReencryptionQuery],
        ask: _Ask,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[_ShareCollection, list[list[common_pb2.CapsuleFragment] | KmsError]]:
        """Serve the capsules of one signed read (a single is a batch of one): admit the
        requester, ask the nodes, and settle the admission with what was served. Each
        capsule's outcome, in order."""
        first = queries[0]
        ticket, patient = await self._admit(
            [(claims, first.signed.signature)],
            first.requester,
            first.patient,
            request_cost(len(queries)),
            context,
        )
        timeout = self._timeout(context)
        collection = _ShareCollection(
            self._settings.threshold,
            self._pool.node_ids,
            {q.record_id: _Verifier(q, patient) for q in queries},
        )
        await self._fan_out(lambda node: ask(node, timeout), collection)
        outcomes = [collection.outcome(q.record_id) for q in queries]
        refused = [o.grpc_status for o in outcomes if isinstance(o, KmsError)]
        self._settle(ticket, served=len(outcomes) - len(refused), refused=refused)
        return collection, outcomes

    async def _fan_out(
        self,
        call: Callable[[AioNodeStub], Awaitable[node_pb2.ReencryptBatchResponse]],
        collection: _ShareCollection,
    ) -> None:
        """Ask nodes, best first, until the collection is finished or no node is left.

        Starts with as many nodes as the threshold needs; asks one more whenever a
        node fails, and when the hedge delay passes without an answer.
        """
        loop = asyncio.get_running_loop()
        queue = iter(self._pool.plan(time.monotonic()))
        tasks: dict[asyncio.Future[node_pb2.ReencryptBatchResponse], tuple[str, float]] = {}

        def launch(count: int) -> None:
            for _ in range(count):
                node_id = next(queue, None)
                if node_id is None:
                    return
                stub = self._stubs[node_id].next()
                tasks[asyncio.ensure_future(call(stub))] = (node_id, loop.time())

        launch(collection.more_needed(0))
        hedge_delay = self._pool.hedge_delay()
        try:
            while tasks and not collection.finished:
                done, _ = await asyncio.wait(
                    tasks, timeout=hedge_delay, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    launch(1)  # hedge: a slow node should not hold the request up
                    continue
                for task in done:
                    node_id, started = tasks.pop(task)
                    latency = loop.time() - started
                    try:
                        response = task.result()
                    except grpc.RpcError as e:
                        error = rpc.error_from_rpc(e)
                        self._pool.answered(node_id, latency, error.grpc_status, time.monotonic())
                        collection.fail(node_id, error.grpc_status, error.message)
                        continue
                    self._pool.succeeded(node_id, latency)
                    collection.take(node_id, response)
                launch(collection.more_needed(len(tasks)))
        finally:
            # Cancelling saves us waiting, not the node's work: that is why only as
            # many nodes as needed are asked.
            for task in tasks:
                task.cancel()

    @staticmethod
    def _log_failures(bound: Any, collector: FragmentCollector) -> None:
        for failure in collector.failures:
            bound.info("node_failed", node_id=failure.node_id, status=failure.status)
