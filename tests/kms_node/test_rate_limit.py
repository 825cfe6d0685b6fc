from __future__ import annotations

import pytest

from medkms.core.errors import ResourceExhausted
from medkms.node.rate_limit import RateLimiter


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
    limiter = RateLimiter(rate_per_s=1, burst=2, max_requesters=2, clock=clock)
    limiter.spend("a")
    limiter.spend("b")
    with pytest.raises(ResourceExhausted, match="too many requesters"):
        limiter.spend("c")
    clock.now = 5.0  # a and b have refilled: nothing to remember
    limiter.spend("c")
