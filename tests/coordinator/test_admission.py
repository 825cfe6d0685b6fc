"""The coordinator's admission control (issue 10): per-requester budgets that refusals
drain ten times faster, and per-address refusal budgets for requesters not yet served."""

from __future__ import annotations

from dataclasses import fields

import pytest

from coordinator.admission import Admission, peer_address
from coordinator.settings import CoordinatorSettings
from core.errors import ResourceExhausted
from core.rate_limit import request_cost
from kms_node.settings import NodeSettings


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock) -> Admission:
    return Admission(
        requester_rate_per_s=10,
        requester_burst=20,
        peer_refusals_per_s=1,
        peer_refusal_burst=3,
        served_memory_s=60,
        clock=clock,
    )


def test_peer_addresses_drop_the_port() -> None:
    assert peer_address("ipv4:10.1.2.3:45678") == "10.1.2.3"
    assert peer_address("unix:/run/app.sock") == "unix:/run/app.sock"


def test_an_ipv6_host_is_charged_by_its_64() -> None:
    """A host given a /64 (as most are) cannot draw on 2**64 refusal budgets: every
    address in it shares one; the next /64 is another party."""
    assert peer_address("ipv6:[2001:db8::1]:443") == "2001:db8::/64"
    assert peer_address("ipv6:[2001:db8::ffff:1:2:3]:443") == "2001:db8::/64"
    assert peer_address("ipv6:[2001:db8:0:1::1]:443") == "2001:db8:0:1::/64"
    assert peer_address("ipv6:[fe80::1%25eth0]:443") == "fe80::/64"  # the zone dropped
    assert peer_address("ipv6:[::ffff:10.1.2.3]:443") == "10.1.2.3"  # as IPv4
    assert peer_address("ipv6:[not-an-address]:443") == "ipv6:[not-an-address]:443"


def test_new_requesters_from_one_ipv6_64_share_one_refusal_budget() -> None:
    gate = admission(Clock())  # an address's burst of refusals: 3
    admitted = 0
    for i in range(100):
        peer = peer_address(f"ipv6:[2001:db8::{i + 1:x}:1]:443")
        try:
            gate.admit(f"0x{i:040x}", peer, cost=1)
            admitted += 1
        except ResourceExhausted:
            pass
    assert admitted == 3
    gate.admit("0x" + "ff" * 20, peer_address("ipv6:[2001:db8:0:1::1]:443"), cost=1)


def test_a_batch_costs_a_quarter_per_extra_capsule() -> None:
    assert request_cost(1) == 1
    assert request_cost(33) == 9


def admitted_in_ten_seconds(gate: Admission, clock: Clock, *, refused: bool) -> int:
    """A requester trying every 10 ms for 10 s; how many requests get through."""
    count = 0
    for tick in range(1000):
        clock.now = tick / 100
        try:
            ticket = gate.admit("0xrequester", "1.1.1.1", 1)
        except ResourceExhausted as e:
            assert "rate limit for this requester" in e.message
            continue
        count += 1
        gate.settle(ticket, served=0 if refused else 1, refused=1 if refused else 0)
    return count


def serve(gate: Admission, requester: str, peer: str) -> None:
    gate.settle(gate.admit(requester, peer, 1), served=1, refused=0)


def refuse(gate: Admission, requester: str, peer: str) -> None:
    gate.settle(gate.admit(requester, peer, 1), served=0, refused=1)


def test_a_requester_whose_requests_are_refused_is_slowed_ten_times() -> None:
    clock = Clock()
    served = admitted_in_ten_seconds(admission(clock), clock, refused=False)
    clock = Clock()
    gate = admission(clock)
    serve(gate, "0xrequester", "1.1.1.1")  # served: its address's refusals do not concern it
    refused = admitted_in_ten_seconds(gate, clock, refused=True)
    assert abs(served - (20 + 100)) <= 1  # the burst, then 10/s
    assert abs(refused - (2 + 10)) <= 1  # the burst, then 1/s: ten tokens a refusal


def test_requests_sent_at_once_get_no_further_than_one_after_another() -> None:
    # A stranger pays the refusal price at admission, before the nodes have answered:
    # twenty calls in flight at once get two through, not twenty.
    gate = admission(Clock())
    admitted = []
    with pytest.raises(ResourceExhausted):
        for _ in range(20):
            admitted.append(gate.admit("0xstranger", "1.1.1.1", 1))
    assert len(admitted) == 2
    # Served, the price comes back: it is an honest requester's first read.
    gate.settle(admitted[0], served=1, refused=0)
    gate.admit("0xstranger", "1.1.1.1", 1)


def test_throw_away_keys_from_one_address_get_its_few_refusals() -> None:
    clock = Clock()
    gate = admission(clock)
    serve(gate, "0xdoctor", "6.6.6.6")
    for i in range(3):  # the address's burst (the doctor's first request was refunded)
        refuse(gate, f"0xthrowaway{i}", "6.6.6.6")
    with pytest.raises(ResourceExhausted, match="not yet served from this address"):
        gate.admit("0xthrowaway-next", "6.6.6.6", 1)
    # A requester served lately is not held up by its address's refusals, nor is a new
    # requester from another address.
    serve(gate, "0xdoctor", "6.6.6.6")
    serve(gate, "0xnewcomer", "7.7.7.7")
    clock.now = 1.0  # one refusal a second comes back
    gate.admit("0xthrowaway-next", "6.6.6.6", 1)


def test_a_served_requester_is_exempt_only_for_a_while() -> None:
    clock = Clock()
    gate = admission(clock)
    serve(gate, "0xdoctor", "6.6.6.6")
    for i in range(3):
        refuse(gate, f"0xstranger{i}", "6.6.6.6")
    serve(gate, "0xdoctor", "6.6.6.6")  # exempt: served lately
    clock.now = 70.0  # forgotten; the address has refilled meanwhile
    for i in range(3):
        refuse(gate, f"0xstranger{i}", "6.6.6.6")
    with pytest.raises(ResourceExhausted, match="not yet served from this address"):
        gate.admit("0xdoctor", "6.6.6.6", 1)


def test_a_requester_the_coordinator_admits_stays_inside_a_nodes_default_budget() -> None:
    """The coordinator holds requesters to their budget; a node's is the backstop. With
    the defaults, what the coordinator admits (plus its retries and hedges) must fit
    well inside what a node allows, or a node refuses an honest requester when no other
    node can answer (as it did in a partition of n - m nodes)."""
    coordinator = _defaults(CoordinatorSettings)
    node = _defaults(NodeSettings)
    assert coordinator["requester_rate_per_s"] * 2 <= node["rate_limit_per_s"]
    assert coordinator["requester_burst"] * 2 <= node["rate_limit_burst"]


def _defaults(settings: type) -> dict[str, float]:
    """The numeric defaults of a settings dataclass."""
    return {
        f.name: float(f.default)
        for f in fields(settings)
        if isinstance(f.default, int | float) and not isinstance(f.default, bool)
    }
