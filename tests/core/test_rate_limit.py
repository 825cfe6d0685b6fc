from __future__ import annotations

import pytest

from core.errors import ResourceExhausted
from core.rate_limit import RateLimiter


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=10, burst=3, clock=clock)
    for _ in range(3):
        limiter.spend("alice")
    with pytest.raises(ResourceExhausted, match="retry in 0.1s"):
        limiter.spend("alice")
    limiter.spend("bob")  # budgets are per requester
    clock.now = 0.1
    limiter.spend("alice")


def test_a_batch_costs_one_token_per_capsule() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1, burst=10, clock=clock)
    limiter.spend("alice", cost=8)
    with pytest.raises(ResourceExhausted):
        limiter.spend("alice", cost=3)


def test_memory_is_bounded_and_idle_requesters_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1, burst=2, max_keys=2, clock=clock)
    limiter.spend("a")
    limiter.spend("b")
    with pytest.raises(ResourceExhausted, match="too many parties"):
        limiter.spend("c")
    clock.now = 5.0  # a and b have refilled: nothing to remember
    limiter.spend("c")


def test_each_of_two_processes_enforces_half_the_limit() -> None:
    clock = Clock()
    shares = [
        RateLimiter.share_of(rate_per_s=10, burst=4, processes=2, clock=clock) for _ in range(2)
    ]
    for share in shares:
        share.spend("alice", cost=2)
        with pytest.raises(ResourceExhausted, match="retry in 0.2s"):  # 5 tokens a second
            share.spend("alice")
    # Spread over both processes, the requester got the configured burst (4), not twice it.
    clock.now = 0.2
    for share in shares:
        share.spend("alice")


def test_one_process_enforces_the_whole_limit() -> None:
    clock = Clock()
    limiter = RateLimiter.share_of(rate_per_s=10, burst=3, processes=1, clock=clock)
    limiter.spend("alice", cost=3)
    with pytest.raises(ResourceExhausted, match="retry in 0.1s"):
        limiter.spend("alice")


def test_a_share_of_the_burst_is_never_below_one() -> None:
    clock = Clock()
    limiter = RateLimiter.share_of(rate_per_s=10, burst=3, processes=4, clock=clock)
    limiter.spend("alice")
    with pytest.raises(ResourceExhausted, match="retry in 0.4s"):  # 2.5 tokens a second
        limiter.spend("alice")
    with pytest.raises(ValueError, match="processes"):
        RateLimiter.share_of(rate_per_s=10, burst=3, processes=0)


def test_a_charge_after_the_fact_puts_the_requester_in_debt_until_refilled() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=10, burst=5, max_keys=1, clock=clock)
    limiter.spend("alice")
    limiter.charge("alice", 100)  # capped at one burst of debt: -5
    with pytest.raises(ResourceExhausted, match="retry in 0.6s"):
        limiter.spend("alice")
    # A requester in debt is not forgotten when room is needed for another.
    clock.now = 0.55
    with pytest.raises(ResourceExhausted, match="too many parties"):
        limiter.spend("bob")
    clock.now = 0.6
    limiter.spend("alice")


def test_try_spend_takes_what_there_is_and_says_whether_it_did() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2, burst=2, what="this address", clock=clock)
    assert limiter.try_spend("peer", cost=1.5)
    assert not limiter.try_spend("peer")  # half a token left: nothing taken
    assert limiter.try_spend("peer", cost=0.5)
    with pytest.raises(ResourceExhausted, match="rate limit for this address exceeded"):
        limiter.spend("peer")
    clock.now = 0.5
    assert limiter.try_spend("peer")


def test_a_cost_above_the_burst_is_taken_from_a_full_bucket_into_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1, burst=4, clock=clock)
    limiter.spend("alice", cost=10)  # an enrollment costs more than a small share's burst
    with pytest.raises(ResourceExhausted, match="retry in 5.0s"):
        limiter.spend("alice")  # 4 - 10 = -6, capped at -4: 5 s to a whole token
    clock.now = 5.0
    with pytest.raises(ResourceExhausted, match="retry in 3.0s"):
        limiter.spend("alice", cost=10)  # needs a full bucket again
    clock.now = 8.0
    limiter.spend("alice", cost=10)
