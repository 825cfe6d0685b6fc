"""Run a local anvil chain for development and tests, and poke its dev-only RPC methods.

    with AnvilProcess(log_path=tmp / "anvil.log") as anvil:
        client = RegistryClient.deploy(anvil.rpc_url, deployer)

Accounts are generated fresh and funded with ``set_balance``; anvil's well-known default
keys are never used. The JSON-RPC here is plain urllib so that the launcher needs no web3.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from core import bounded_json
from core.bounded_json import JSON_RPC_MAX_BYTES, JSON_RPC_MAX_DEPTH
from core.errors import ChainRejected, ChainUnavailable, InvalidRequest, PreconditionFailed
from deploy import processes

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_ANVIL = REPO_ROOT / "node_modules" / ".bin" / "anvil"
HOST = "127.0.0.1"
_LOG_TAIL_BYTES = 2000
#: the slowest interval mining offered (Ethereum mainnet mines every 12 s)
MAX_BLOCK_TIME_S = 60
_rpc_ids = itertools.count(1)


def find_anvil() -> str:
    """The repo's pinned anvil (npm), else one on $PATH."""
    if LOCAL_ANVIL.is_file() and os.access(LOCAL_ANVIL, os.X_OK):
        return str(LOCAL_ANVIL)
    found = shutil.which("anvil")
    if found is None:
        raise PreconditionFailed(f"anvil not found at {LOCAL_ANVIL} or on $PATH; run `make setup`")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def rpc_call(rpc_url: str, method: str, params: list[Any], *, timeout_s: float = 5.0) -> Any:
    """One JSON-RPC request: transport trouble -> ChainUnavailable, RPC error -> ChainRejected."""
    if not rpc_url.startswith(("http://", "https://")):
        raise ChainUnavailable(f"not an http(s) RPC URL: {rpc_url}")
    body = json.dumps({"jsonrpc": "2.0", "id": next(_rpc_ids), "method": method, "params": params})
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        rpc_url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - see above
            body = response.read(JSON_RPC_MAX_BYTES + 1)
        reply = bounded_json.loads_object(
            body, max_bytes=JSON_RPC_MAX_BYTES, max_depth=JSON_RPC_MAX_DEPTH, what="the answer"
        )
    except InvalidRequest as e:
        raise ChainUnavailable(f"chain RPC {method} at {rpc_url}: {e.message}") from e
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSError
        raise ChainUnavailable(f"chain RPC {method} at {rpc_url} failed: {e}") from e
    if "error" in reply:
        message = reply["error"].get("message", "") if isinstance(reply["error"], dict) else ""
        raise ChainRejected(f"chain refused {method}: {message}")
    return reply.get("result")


def increase_time(rpc_url: str, seconds: int) -> None:
    """Move anvil's clock forward and mine a block so that block.timestamp shows it."""
    rpc_call(rpc_url, "evm_increaseTime", [int(seconds)])
    rpc_call(rpc_url, "evm_mine", [])


def mine(rpc_url: str, blocks: int = 1) -> None:
    """Mine ``blocks`` empty blocks now (anvil only), as a chain's head moves on."""
    if not 1 <= blocks <= 1000:
        raise InvalidRequest("mine: blocks must be between 1 and 1000")
    rpc_call(rpc_url, "anvil_mine", [hex(blocks)])


def set_balance(rpc_url: str, address: str, wei: int) -> None:
    """Fund an account out of thin air (anvil only)."""
    rpc_call(rpc_url, "anvil_setBalance", [address, hex(wei)])


class AnvilProcess:
    """An anvil child process on 127.0.0.1, logging to ``log_path``.

    ``start()`` (or ``with``) returns once ``eth_chainId`` answers; ``stop()`` is idempotent.
    By default anvil mines each transaction at once in a block of its own; with
    ``block_time_s`` it mines a block every that many seconds, as a real chain does
    (transactions wait in the mempool for the next block). ``prune_history`` keeps only
    that many recent states, as a node that is not an archive node does: a read at an
    older block fails.
    """

    def __init__(
        self,
        *,
        log_path: Path,
        port: int | None = None,
        chain_id: int | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        block_time_s: int | None = None,
        prune_history: int | None = None,
    ) -> None:
        if block_time_s is not None and not 1 <= block_time_s <= MAX_BLOCK_TIME_S:
            raise InvalidRequest(f"block_time_s must be between 1 and {MAX_BLOCK_TIME_S}")
        if prune_history is not None and prune_history < 1:
            raise InvalidRequest("prune_history must be at least 1 (states kept)")
        self._block_time_s = block_time_s
        self._prune_history = prune_history
        self.log_path = Path(log_path)
        self._requested_port = port
        self._chain_id = chain_id
        self._startup_timeout_s = startup_timeout_s
        self._extra_args = extra_args
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"AnvilProcess(port={self._port}, {state}, log={str(self.log_path)!r})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise PreconditionFailed("anvil has not been started")
        return self._port

    @property
    def rpc_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> AnvilProcess:
        if self._process is not None:
            raise PreconditionFailed("anvil is already started")
        binary = find_anvil()
        # Without this, a chain already listening on the port would answer our readiness probe.
        if self._requested_port is not None and not _port_is_free(self._requested_port):
            raise ChainUnavailable(f"port {self._requested_port} on {HOST} is already in use")
        # A port we picked ourselves may be taken between picking and binding: try again.
        attempts_left = 1 if self._requested_port is not None else 3
        while True:
            attempts_left -= 1
            self._port = self._requested_port or processes.free_port(HOST)
            self._spawn(binary)
            try:
                self._wait_ready()
                return self
            except ChainUnavailable:
                exited = self._process is not None and self._process.poll() is not None
                self.stop()
                if not exited or attempts_left == 0:
                    raise

    def _spawn(self, binary: str) -> None:
        args = [binary, "--host", HOST, "--port", str(self._port), "--silent"]
        if self._chain_id is not None:
            args += ["--chain-id", str(self._chain_id)]
        if self._block_time_s is not None:
            args += ["--block-time", str(self._block_time_s)]
        if self._prune_history is not None:
            args += ["--prune-history", str(self._prune_history)]
        args += list(self._extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        # Own session: a detached local cluster's chain must outlive the launcher's
        # terminal job (Ctrl-C there must not reach it).
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise ChainUnavailable(
                    f"anvil exited with code {code} while starting on port {self._port};"
                    f" log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                rpc_call(self.rpc_url, "eth_chainId", [], timeout_s=1.0)
                return
            except ChainUnavailable:
                pass
            if time.monotonic() > deadline:
                raise ChainUnavailable(
                    f"anvil did not answer on {self.rpc_url} within {self._startup_timeout_s}s;"
                    f" log tail ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (then kill) the process and close the log."""
        process, self._process = self._process, None
        if process is not None:
            processes.stop(process, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> AnvilProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
