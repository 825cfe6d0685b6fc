"""The separate hosts the multi-host tests run on (deploy/netns.py): each reaches the
others over the private LAN only, and a partition or a barred route does what it says."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import netns
from deploy.netns import Host, HostNetwork

pytestmark = pytest.mark.multihost

PORT = 7000
#: a listener that answers every connection with "hello" until killed
SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(({address!r}, {port})); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"
)
CLIENT = (
    "import socket, sys\n"
    "try:\n"
    "    c = socket.create_connection(({address!r}, {port}), timeout=1.0)\n"
    "    print(c.recv(5).decode())\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


@pytest.fixture
def lan() -> Iterator[HostNetwork]:
    with HostNetwork.create("nt") as network:
        yield network


def _serve(host: Host, tmp_path: Path) -> None:
    host.spawn(
        [sys.executable, "-c", SERVER.format(address=host.address, port=PORT)],
        tmp_path / f"{host.name}.log",
    )
    deadline = time.monotonic() + 10
    while _reach(host, host) != "hello":
        assert time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.05)


def _reach(client: Host, server: Host) -> str:
    done = client.run(
        [sys.executable, "-c", CLIENT.format(address=server.address, port=PORT)], timeout_s=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_hosts_reach_each_other_over_the_lan_only(lan: HostNetwork, tmp_path: Path) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    assert a.address != b.address
    _serve(b, tmp_path)
    assert _reach(a, b) == "hello"
    # The machine's own network is not on the LAN: a host has no route out of it.
    routes = subprocess.run(
        ["ip", "-n", a.namespace, "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert "default" not in routes
    assert str(netns.LAN) in routes


def test_a_cut_link_partitions_a_host_until_it_is_mended(lan: HostNetwork, tmp_path: Path) -> None:
    a, b, c = lan.add_host("a"), lan.add_host("b"), lan.add_host("c")
    _serve(b, tmp_path)
    lan.cut(b)
    assert _reach(a, b) == "TimeoutError"
    assert _reach(c, b) == "TimeoutError"
    lan.mend(b)
    deadline = time.monotonic() + 10
    while _reach(a, b) != "hello":
        assert time.monotonic() < deadline, "the mended link did not carry traffic again"


def test_a_barred_route_stops_one_host_only(lan: HostNetwork, tmp_path: Path) -> None:
    a, b, c = lan.add_host("a"), lan.add_host("b"), lan.add_host("c")
    _serve(b, tmp_path)
    lan.bar(a, b)
    assert _reach(a, b) != "hello"
    assert _reach(c, b) == "hello"
    lan.unbar(a, b)
    assert _reach(a, b) == "hello"


def test_close_stops_the_hosts_processes_and_removes_every_namespace(tmp_path: Path) -> None:
    network = HostNetwork.create("nt")
    host = network.add_host("a")
    _serve(host, tmp_path)
    process = host.processes[0]
    network.close()
    assert process.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert network.prefix not in listed


def test_check_passes_where_namespaces_can_be_made() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy.netns", "check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
