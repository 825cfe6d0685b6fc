"""Separate network hosts on one Linux machine, for the multi-host tests.

Each host is a network namespace with its own loopback, its own address on a private
LAN and nothing else: it reaches the other hosts through a bridge that lives in a
namespace of its own, never the machine's real network, so traffic stays between the
namespaces made here. A host's link can be cut (a partition) and mended, and one host
can be barred from reaching another (a blackhole route) while the rest of its traffic
flows. Processes are started inside a host with ``ip netns exec``.

    with HostNetwork.create("mh") as lan:
        chain = lan.add_host("chain")
        node = lan.add_host("node-1")
        node.spawn(["kms-node", "serve", "--config", ...], log_path)
        lan.cut(node); lan.mend(node)
        lan.bar(node, chain); lan.unbar(node, chain)

Making namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); ``unavailable()`` says
why they cannot be made here, and ``python -m deploy.netns check`` exits non-zero
with that reason, so that a multi-host run never passes by doing nothing.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from core.errors import PreconditionFailed
from deploy import processes

#: the private LAN the hosts share; the bridge namespace holds no address on it
LAN = ipaddress.ip_network("10.77.0.0/24")
_BRIDGE = "br0"
#: a host's end of its link, inside its namespace
_HOST_LINK = "lan0"
_COMMAND_TIMEOUT_S = 10.0
_MAX_HOSTS = 200


def _ip(*args: str) -> None:
    """Run one ``ip`` command; its error output becomes the exception's message."""
    try:
        done = subprocess.run(
            ["ip", *args],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PreconditionFailed(f"ip {' '.join(args)}: {e}") from None
    if done.returncode != 0:
        raise PreconditionFailed(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "making network namespaces needs root; run `make test-multihost` as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed; run `make setup` as root"
    probe = f"mkprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except PreconditionFailed as e:
        return f"this machine refuses to make a network namespace: {e}"
    try:
        _ip("netns", "del", probe)
    except PreconditionFailed as e:
        return f"a probe namespace could not be removed: {e}"
    return None


@dataclass
class Host:
    """One namespace on the LAN: ``address`` is how the other hosts reach it."""

    name: str
    namespace: str
    address: str
    bridge_link: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def spawn(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host, its output appended to ``log_path``; the
        network stops it when it closes."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.processes.append(process)
        return process

    def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to completion; the caller checks its result."""
        return subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )


class HostNetwork:
    """Hosts on one private LAN; ``close()`` stops their processes and removes every
    namespace it made, whatever state they are in."""

    def __init__(self, prefix: str) -> None:
        if not prefix.isalnum() or not 1 <= len(prefix) <= 6:
            raise ValueError("a network prefix is 1 to 6 letters or digits")
        # Unique per process, so that runs side by side do not meet.
        self.prefix = f"{prefix}{os.getpid() % 100000}"
        self.lan_namespace = f"{self.prefix}-lan"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    @classmethod
    def create(cls, prefix: str) -> HostNetwork:
        reason = unavailable()
        if reason is not None:
            raise PreconditionFailed(reason)
        network = cls(prefix)
        try:
            network._add_namespace(network.lan_namespace)
            _ip("-n", network.lan_namespace, "link", "add", _BRIDGE, "type", "bridge")
            _ip("-n", network.lan_namespace, "link", "set", _BRIDGE, "up")
        except BaseException:
            network.close()
            raise
        return network

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._made.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new host with the next free address on the LAN."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        index = len(self.hosts) + 1
        if index > _MAX_HOSTS:
            raise ValueError(f"at most {_MAX_HOSTS} hosts on one LAN")
        host = Host(
            name=name,
            namespace=f"{self.prefix}-{name}",
            address=str(LAN.network_address + 10 + index),
            bridge_link=f"h{index}",
        )
        self._add_namespace(host.namespace)
        _ip(
            "link", "add", _HOST_LINK, "netns", host.namespace,
            "type", "veth", "peer", "name", host.bridge_link, "netns", self.lan_namespace,
        )  # fmt: skip
        _ip(
            "-n",
            host.namespace,
            "addr",
            "add",
            f"{host.address}/{LAN.prefixlen}",
            "dev",
            _HOST_LINK,
        )
        _ip("-n", host.namespace, "link", "set", _HOST_LINK, "up")
        _ip("-n", self.lan_namespace, "link", "set", host.bridge_link, "master", _BRIDGE)
        _ip("-n", self.lan_namespace, "link", "set", host.bridge_link, "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Partition: the host's link goes down at the bridge; packets to and from it
        are lost (connections time out, as across a failed switch port)."""
        _ip("-n", self.lan_namespace, "link", "set", host.bridge_link, "down")

    def mend(self, host: Host) -> None:
        _ip("-n", self.lan_namespace, "link", "set", host.bridge_link, "up")

    def bar(self, host: Host, peer: Host) -> None:
        """``host`` can no longer reach ``peer`` (a blackhole route in ``host``); every
        other host still can."""
        _ip("-n", host.namespace, "route", "add", "blackhole", f"{peer.address}/32")

    def unbar(self, host: Host, peer: Host) -> None:
        _ip("-n", host.namespace, "route", "del", "blackhole", f"{peer.address}/32")

    def close(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                processes.stop(process, group=True)
        for namespace in reversed(self._made):
            try:
                _ip("netns", "del", namespace)
            except PreconditionFailed:
                pass  # already gone
        self._made.clear()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["check"]:
        print("usage: python -m deploy.netns check", file=sys.stderr)
        return 2
    reason = unavailable()
    if reason is not None:
        print(f"multi-host tests cannot run here: {reason}", file=sys.stderr)
        return 1
    print("network namespaces can be made here")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
