"""The coordinator's admission control (issue 10): per-requester budgets that refusals
drain ten times faster, and per-address refusal budgets for requesters not yet served."""

from __future__ import annotations

import pytest

from medkms.coordinator.admission import Admission, peer_address
from medkms.core.errors import ResourceExhausted
from medkms.core.rate_limit import request_cost


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
    assert peer_address("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert peer_address("unix:/run/app.sock") == "unix:/run/app.sock"


def test_a_batch_costs_a_quarter_per_extra_capsule() -> None:
    assert request_cost(1) == 1
    assert request_cost(33) == 9


def admitted_in_ten_seconds(gate: Admission, clock: Clock, *, refused: bool) -> int:
    """A requester trying every 10 ms for 10 s; how many requests get through."""
    count = 0
    for tick in range(1000):
        clock.now = tick / 100
        try:
            gate.admit("0xrequester", "1.1.1.1", 1)
        except ResourceExhausted as e:
            assert "rate limit for this requester" in e.message
            continue
        count += 1
        if refused:
            gate.refused("0xrequester", "1.1.1.1")
        else:
            gate.served("0xrequester")
    return count


def test_a_requester_whose_requests_are_refused_is_slowed_ten_times() -> None:
    clock = Clock()
    served = admitted_in_ten_seconds(admission(clock), clock, refused=False)
    clock = Clock()
    gate = admission(clock)
    gate.served("0xrequester")  # served before: its address's refusals do not concern it
    refused = admitted_in_ten_seconds(gate, clock, refused=True)
    assert abs(served - (20 + 100)) <= 1  # the burst, then 10/s
    assert abs(refused - (2 + 10)) <= 1  # the burst, then 1/s: ten tokens a refusal


def test_throw_away_keys_from_one_address_get_its_few_refusals() -> None:
    clock = Clock()
    gate = admission(clock)
    gate.served("0xdoctor")
    for i in range(3):  # the address's burst of refusals
        gate.admit(f"0xthrowaway{i}", "6.6.6.6", 1)
        gate.refused(f"0xthrowaway{i}", "6.6.6.6")
    with pytest.raises(ResourceExhausted, match="not yet served from this address"):
        gate.admit("0xthrowaway-next", "6.6.6.6", 1)
    # A requester served lately is not held up by its address's refusals, nor is a new
    # requester from another address.
    gate.admit("0xdoctor", "6.6.6.6", 1)
    gate.admit("0xnewcomer", "7.7.7.7", 1)
    clock.now = 1.0  # one refusal a second comes back
    gate.admit("0xthrowaway-next", "6.6.6.6", 1)


def test_a_served_requester_is_exempt_only_for_a_while() -> None:
    clock = Clock()
    gate = admission(clock)
    for i in range(3):
        gate.refused(f"0xstranger{i}", "6.6.6.6")
    gate.served("0xdoctor")
    gate.admit("0xdoctor", "6.6.6.6", 1)
    clock.now = 61.0  # forgotten; by now the address has refilled as well
    gate.admit("0xdoctor", "6.6.6.6", 1)
    for i in range(3):
        gate.refused(f"0xstranger{i}", "6.6.6.6")
    with pytest.raises(ResourceExhausted):
        gate.admit("0xdoctor", "6.6.6.6", 1)
