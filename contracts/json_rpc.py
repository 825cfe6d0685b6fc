"""The chain's JSON-RPC over HTTP, with every answer bounded: in size while it is read, in
nesting before it is decoded, and in total time.

The chain endpoint is not trusted to be sane (docs/threat-model.md): it may answer with a
body of gigabytes, JSON nested deeply enough to overflow the C stack (web3 raises Python's
recursion limit to 100 000), or a byte every few seconds. web3's ``HTTPProvider`` reads the
whole body with ``requests`` and decodes it with ``json.loads``, and a per-read timeout lets a
trickling server hold a call for ever. So :class:`BoundedHTTPProvider` keeps web3's provider
(request encoding, the request cache, middleware) and replaces only the two ends:

- the HTTP exchange (web3's session-manager seam, ``make_post_request``: request bytes in,
  answer bytes out) is :class:`JsonRpcTransport`, which reads at most ``max_bytes`` and
  gives up at a deadline ``timeout_s`` after the call began, whatever arrives meanwhile;
- decoding is :func:`core.bounded_json.loads_object`.

Both raise :class:`~core.errors.ChainUnavailable` with a reason that names the
endpoint by scheme, host and port only (hosted RPC URLs carry API keys).
"""

from __future__ import annotations

import base64
import heapq
import http.client
import itertools
import os
import select
import socket
import ssl
import threading
import time
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

from web3 import HTTPProvider
from web3._utils.http_session_manager import HTTPSessionManager
from web3.types import RPCResponse

from core.bounded_json import JSON_RPC_MAX_DEPTH, loads_object
from core.errors import ChainAnswerTooLarge, ChainUnavailable, InvalidRequest

#: bytes read from the socket at a time
_READ_CHUNK: Final = 64 * 1024
#: the longest quantity read (a block number, a timestamp): 0x and 16 hex digits, 64 bits
_MAX_QUANTITY_CHARS: Final = 18


class MalformedAnswer(ValueError):
    """An answer that is not what was asked for (a block that is not one, a log of another
    contract, a log that does not decode by its event's ABI). The message says what is
    wrong and where, never the endpoint's bytes; ``ChainTransport`` reports it as
    ``ChainUnavailable`` ("answered malformed data: ...")."""


def quantity(value: Any) -> int | None:
    """A JSON-RPC QUANTITY (``0x``-prefixed hex, at most 64 bits) as an int; None if
    ``value`` is not one."""
    if (
        isinstance(value, str)
        and value.isascii()
        and value.startswith("0x")
        and 2 < len(value) <= _MAX_QUANTITY_CHARS
        and value[2:].isalnum()
    ):
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def data(value: Any, length: int | None = None) -> bytes | None:
    """A JSON-RPC DATA (``0x``-prefixed hex) as bytes, of ``length`` bytes if given; None
    if ``value`` is not one."""
    if not isinstance(value, str) or not value.startswith("0x"):
        return None
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError:
        return None
    # fromhex skips whitespace: the length says whether every character was a digit
    if 2 * len(raw) != len(value) - 2 or (length is not None and len(raw) != length):
        return None
    return raw


class JsonRpcTransport:
    """POSTs request bodies to one JSON-RPC endpoint; one kept-alive connection per thread."""

    def __init__(self, url: str, *, timeout_s: float, max_bytes: int, safe_url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest("rpc_url must be an http(s) URL")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._auth: dict[str, str] = {}
        if parts.username is not None:
            # As requests does: credentials in the URL become HTTP basic authentication.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.safe_url = safe_url
        self._tls_context = ssl.create_default_context() if self._tls else None
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"JsonRpcTransport({self.safe_url!r})"

    def post(self, body: bytes, headers: dict[str, str]) -> bytes:
        """The answer's body, or ChainUnavailable saying why there is none."""
        with _Deadline(self.timeout_s) as deadline:
            try:
                conn = self._connection(deadline)
                conn.request("POST", self._target, body, {**headers, **self._auth})
                answer = self._read(conn.getresponse())
                if deadline.expired:
                    # What was read ended at the cut, not where the peer meant it to.
                    raise ConnectionAbortedError
            except (OSError, http.client.HTTPException, ChainUnavailable) as e:
                self._drop()
                # A socket timeout is the whole call's time too (each read may take
                # timeout_s), even when the deadline's timer thread has not run yet.
                if deadline.expired or isinstance(e, TimeoutError):
                    raise self.unavailable(f"no complete answer within {self.timeout_s:g}s") from e
                if isinstance(e, ChainUnavailable):
                    raise
                if isinstance(e, ssl.SSLCertVerificationError):
                    # OpenSSL's reason (self-signed, unknown issuer, expired, hostname
                    # mismatch) names no more than the host: enough to act on.
                    reason = str(e.verify_message or e.reason or "not verified").rstrip(".")
                    raise self.unavailable(
                        f"TLS certificate refused ({reason}): it must chain to a certificate "
                        f"authority this system trusts and name {self._host}"
                    ) from e
                raise self.unavailable(f"unavailable ({type(e).__name__})") from e
        return answer

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        if not 200 <= response.status < 300:
            raise self.unavailable(f"HTTP status {response.status}")
        header = response.getheader("Content-Length")
        declared = int(header) if header is not None and header.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            raise self._too_large()
        chunks, total = [], 0
        while chunk := response.read(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
        if declared is not None and total != declared:
            # http.client returns a short body as if it were whole.
            raise self.unavailable(f"answer cut short ({total} of {declared} bytes)")
        return b"".join(chunks)

    def _connection(self, deadline: _Deadline) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _idle_socket_is_unusable(conn.sock):
            conn.close()  # the server closed it (or sent garbage) while it was idle
        if conn is None:
            cls = http.client.HTTPSConnection if self._tls else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
        if conn.sock is None:
            sock = socket.create_connection((self._host, self._port), timeout=self.timeout_s)
            deadline.watch(sock)
            # As urllib3 does: without it, Nagle and delayed ACKs cost ~40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                # The handshake runs under the deadline too: a trickling peer is cut. (The
                # TLS socket takes over the plain one's descriptor: watch it, then shake.)
                sock = self._tls_context.wrap_socket(
                    sock, server_hostname=self._host, do_handshake_on_connect=False
                )
                deadline.watch(sock)
                sock.do_handshake()
            conn.sock = sock
        deadline.watch(conn.sock)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _too_large(self) -> ChainAnswerTooLarge:
        return ChainAnswerTooLarge(
            f"chain at {self.safe_url}: answer larger than {self.max_bytes} bytes"
        )

    def unavailable(self, why: str) -> ChainUnavailable:
        return ChainUnavailable(f"chain at {self.safe_url}: {why}")


class _Deadline:
    """Shuts a call's socket down when its time is up, so that a read blocked on a peer
    that trickles bytes returns at once (socket timeouts bound each read, not the call).
    The process's one ``_Watchdog`` thread keeps the time."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = False
        self.finished = False

    def __enter__(self) -> _Deadline:
        _WATCHDOG.watch(time.monotonic() + self._seconds, self)
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self.finished = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)


class _Watchdog:
    """One thread that expires the deadlines of every call in the process. A timer thread
    per call cost about 0.17 ms of CPU to start and cancel, paid by every chain poll.

    Deadlines are kept in a heap; finished ones are dropped when they reach its top. Calls
    share one timeout, so a new deadline is rarely the earliest, and the thread is then
    left asleep: it wakes when the earliest deadline is due, drops what has finished and
    expires what has not."""

    def __init__(self) -> None:
        self._reset()
        # A forked child would have the heap but not the thread: it starts afresh.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, at: float, deadline: _Deadline) -> None:
        with self._cond:
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="json-rpc-deadlines", daemon=True
                )
                self._thread.start()
            elif earliest is None or at < earliest:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
            due.expire()

    def _next_due(self) -> _Deadline:
        """Wait for the earliest unfinished deadline to be due; caller holds the lock."""
        while True:
            while self._heap and self._heap[0][2].finished:
                heapq.heappop(self._heap)
            if not self._heap:
                self._cond.wait()
                continue
            wait_s = self._heap[0][0] - time.monotonic()
            if wait_s <= 0:
                return heapq.heappop(self._heap)[2]
            self._cond.wait(wait_s)


_WATCHDOG = _Watchdog()


def _shut(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also for TLS: it wakes a blocked read without
        # touching the TLS state another thread is using.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _idle_socket_is_unusable(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable was closed by the peer (or holds bytes
    nobody asked for): either way it must not carry the next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _BoundedPost(HTTPSessionManager):
    """web3's seam between a provider and HTTP: ``make_post_request`` takes the encoded
    request and returns the answer's bytes, for single and batch requests alike."""

    def __init__(self, transport: JsonRpcTransport) -> None:
        super().__init__(cache_size=1, session_pool_max_workers=1)
        self._transport = transport

    def make_post_request(
        self, endpoint_uri: Any, data: bytes | dict[str, Any], **kwargs: Any
    ) -> bytes:
        if not isinstance(data, bytes):
            raise InvalidRequest("a JSON-RPC request must be encoded bytes")
        headers = kwargs.get("headers") or {"Content-Type": "application/json"}
        return self._transport.post(data, dict(headers))


class BoundedHTTPProvider(HTTPProvider):
    """web3's HTTP provider with :class:`JsonRpcTransport` underneath and bounded decoding.
    Retries are off (callers own the retry policy); other keywords go to ``HTTPProvider``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_response_bytes: int,
        safe_url: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, exception_retry_configuration=None, **kwargs)
        self._transport = JsonRpcTransport(
            url, timeout_s=timeout_s, max_bytes=max_response_bytes, safe_url=safe_url
        )
        self._request_session_manager = _BoundedPost(self._transport)

    def __str__(self) -> str:
        return f"RPC connection {self._transport.safe_url}"

    def decode_rpc_response(self, raw_response: bytes) -> RPCResponse:  # type: ignore[override]
        try:
            answer = loads_object(
                raw_response,
                max_bytes=self._transport.max_bytes,
                max_depth=JSON_RPC_MAX_DEPTH,
                what="JSON-RPC answer",
            )
        except InvalidRequest as e:
            raise self._transport.unavailable(e.message) from None
        return cast(RPCResponse, answer)
