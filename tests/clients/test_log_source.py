"""The auditor's gRPC log source (clients/audit/auditor.GrpcLogSource) against a real audit
log served over loopback gRPC: it pages by size, and a stream that fails in transit is
retried from after the last entry received, never yielding an entry twice or skipping one."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.audit.auditor import GrpcLogSource
from core.audit import MAX_ENTRIES_PER_CALL
from core.audit_sources import ReadPolicy, failed_in_transit
from core.errors import InvalidRequest, KmsError
from kms_node.audit_log import AuditLog
from kms_node.audit_service import AuditService
from kms_node.keystore import MemoryKeyStore
from proto.kms.v1 import audit_pb2
from proto.stubs import AUDIT_SERVICE
from proto.transport import Transport
from tests.core.test_audit_verify import NODE, make_entry

ENTRIES = 300
#: pages of a few dozen entries, retried at once
SMALL_PAGES = ReadPolicy(page_bytes=20_000, deadline_s=5.0, retries=2, backoff_s=0.0)


class FlakyAudit:
    """The node's Audit service on loopback, whose GetEntries ends the stream after
    ``drop_after`` rows with ``status`` on the calls numbered in ``drop_calls`` (from 1)."""

    def __init__(self, log: AuditLog) -> None:
        service = AuditService(log)
        self.requests: list[tuple[int, int]] = []
        self.drop_calls: set[int] = set()
        self.drop_after = 0
        self.status = grpc.StatusCode.UNAVAILABLE
        self.checkpoint_failures = 0
        #: serve what the log holds of a range that runs past its end, not a refusal
        self.clip = False

        def entries(
            request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
        ) -> Iterator[audit_pb2.AuditLogEntry]:
            self.requests.append((request.start, request.end))
            if self.clip:
                request.start = min(request.start, log.size())
                request.end = min(request.end, log.size())
            rows = service.entries(request)
            if len(self.requests) in self.drop_calls:
                yield from rows[: self.drop_after]
                context.abort(self.status, "connection reset")
            yield from rows

        def checkpoint(
            request: audit_pb2.GetCheckpointRequest, context: grpc.ServicerContext
        ) -> audit_pb2.SignedCheckpoint:
            if self.checkpoint_failures:
                self.checkpoint_failures -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            return service.checkpoint(request)

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "GetCheckpoint": grpc.unary_unary_rpc_method_handler(
                checkpoint,
                request_deserializer=audit_pb2.GetCheckpointRequest.FromString,
                response_serializer=audit_pb2.SignedCheckpoint.SerializeToString,
            ),
            "GetEntries": grpc.unary_stream_rpc_method_handler(
                entries,
                request_deserializer=audit_pb2.GetEntriesRequest.FromString,
                response_serializer=audit_pb2.AuditLogEntry.SerializeToString,
            ),
        }
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(AUDIT_SERVICE.full_name, handlers)]
        )
        port = Transport.plaintext().add_port(self.server, "127.0.0.1:0", require_client_cert=False)
        self.address = f"127.0.0.1:{port}"
        self.server.start()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.sqlite", MemoryKeyStore(), NODE)
    for i in range(ENTRIES):
        log.append(make_entry(i))
    yield log
    log.close()


@pytest.fixture
def node(log: AuditLog) -> Iterator[FlakyAudit]:
    node = FlakyAudit(log)
    yield node
    node.server.stop(grace=0)


def read_all(node: FlakyAudit, policy: ReadPolicy, start: int = 0) -> tuple[list[Any], int]:
    """Every row the source yields from ``start`` on, and how many calls it retried."""
    with Transport.plaintext().channel(node.address) as channel:
        source = GrpcLogSource(channel, NODE, policy=policy)
        rows = list(source.entries(start, ENTRIES))
    return rows, source.retries


def test_a_page_that_ends_short_ends_the_reading(node: FlakyAudit, log: AuditLog) -> None:
    """A node whose checkpoint claims 2^63 entries, and serves none of them past its log:
    the source stops at the first page that ends short, not page after empty page."""
    node.clip = True
    with Transport.plaintext().channel(node.address) as channel:
        source = GrpcLogSource(channel, NODE, policy=SMALL_PAGES)
        rows = list(source.entries(0, 2**63))
    assert rows == list(log.entries(0, ENTRIES))
    assert node.requests[-1][0] < ENTRIES  # the page holding the last entry ended short
    assert len(node.requests) < ENTRIES


def test_pages_are_sized_by_bytes(node: FlakyAudit, log: AuditLog) -> None:
    rows, retries = read_all(node, SMALL_PAGES)
    assert rows == list(log.entries(0, ENTRIES)) and retries == 0
    # Nothing read yet: a page of entries of the largest size (here one); then by the mean.
    assert node.requests[0] == (0, 1)
    mean = sum(len(data) for _, data in rows) / ENTRIES
    sizes = [end - start for start, end in node.requests[1:-1]]
    assert all(abs(size * mean - SMALL_PAGES.page_bytes) <= 2 * mean for size in sizes), sizes
    assert [start for start, _ in node.requests[1:]] == [end for _, end in node.requests[:-1]]


def test_a_dropped_stream_resumes_after_the_last_entry_received(
    node: FlakyAudit, log: AuditLog
) -> None:
    node.drop_calls, node.drop_after = {2, 4}, 5
    rows, retries = read_all(node, SMALL_PAGES, start=7)
    assert rows == list(log.entries(7, ENTRIES)) and retries == 2
    (first, _), (second, second_end), (third, third_end) = node.requests[1:4]
    assert (second, third) == (first + 5, second_end)  # resumed, then the next page
    assert third_end > third


def test_a_page_that_keeps_failing_in_transit_gives_up_after_the_retries(
    node: FlakyAudit,
) -> None:
    node.drop_calls, node.drop_after = {2, 3, 4, 5}, 0
    with pytest.raises(KmsError) as raised:
        read_all(node, SMALL_PAGES)
    assert failed_in_transit(raised.value) and "connection reset" in raised.value.message
    assert len(node.requests) == 2 + SMALL_PAGES.retries
    assert len({r for r in node.requests[1:]}) == 1  # the same page each time: no progress


def test_a_link_that_drops_often_but_makes_progress_is_read_to_the_end(
    node: FlakyAudit, log: AuditLog
) -> None:
    """More drops in one page than the retries allow, each after a few entries: each
    attempt that received entries starts a fresh count, so the whole log is read."""
    node.drop_calls, node.drop_after = set(range(2, 2 + 3 * SMALL_PAGES.retries)), 3
    rows, retries = read_all(node, SMALL_PAGES)
    assert rows == list(log.entries(0, ENTRIES))
    assert retries == 3 * SMALL_PAGES.retries


def test_a_refusal_is_not_retried(node: FlakyAudit) -> None:
    node.drop_calls, node.drop_after = {1}, 0
    node.status = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidRequest):
        read_all(node, SMALL_PAGES)
    assert len(node.requests) == 1


def test_a_checkpoint_that_failed_in_transit_is_asked_again(node: FlakyAudit) -> None:
    node.checkpoint_failures = 2
    with Transport.plaintext().channel(node.address) as channel:
        source = GrpcLogSource(channel, NODE, policy=SMALL_PAGES)
        assert source.checkpoint().tree_size == ENTRIES
    assert source.retries == 2


def test_read_policy_pages_and_deadlines() -> None:
    policy = ReadPolicy()
    assert policy.page_entries(None) == 32  # 1 MiB of entries of the largest size
    assert policy.page_entries(500.0) == 2097
    assert policy.page_entries(10.0) == MAX_ENTRIES_PER_CALL
    assert policy.page_deadline_s(2048, 512.0) == 14.0  # 10 s plus 1 MiB at 256 KiB/s
    assert [policy.backoff(a) for a in (1, 2, 3)] == [0.2, 0.4, 0.8]
    for bad in ({"page_bytes": 0}, {"deadline_s": 0}, {"retries": -1}):
        with pytest.raises(ValueError):
            ReadPolicy(**bad)
