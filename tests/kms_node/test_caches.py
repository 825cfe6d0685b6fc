"""The node's caches of served capsules and unwrapped kfrags (ADR 13)."""

from __future__ import annotations

import pytest
import umbral_pre as umbral

from core.capsule_cache import CapsuleCache
from core.errors import InvalidRequest
from core.record_types import RecordType
from core.umbral_codec import capsule_hash
from kms_node.kfrag_cache import Key, KfragCache

ALICE, BOB, CAROL = "0xA", "0xB", "0xC"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def kfrag() -> umbral.VerifiedKeyFrag:
    delegating, receiving = umbral.SecretKey.random(), umbral.SecretKey.random()
    return umbral.generate_kfrags(
        delegating, receiving.public_key(), umbral.Signer(delegating), 1, 1, True, True
    )[0]


def key(patient: str = ALICE, grantee: str = BOB, wrapped: bytes = b"w1") -> Key:
    return (patient, grantee, RecordType.LAB_RESULT, wrapped)


def test_an_unwrapped_kfrag_lives_ttl_seconds_from_its_unwrap_used_or_not() -> None:
    clock = Clock()
    cache = KfragCache(ttl_s=60, clock=clock)
    k = kfrag()
    cache.put(key(), k, cache.generation())
    clock.now += 59
    assert cache.get(key()) is k
    clock.now += 1
    assert cache.get(key()) is None
    assert len(cache) == 0


def test_expired_kfrags_are_dropped_without_further_traffic() -> None:
    """Exposure is bounded by the TTL, not by the next request: the server drops expired
    entries on its own (kms_node/server.py), whether or not anything is read again."""
    clock = Clock()
    cache = KfragCache(ttl_s=60, clock=clock)
    cache.put(key(wrapped=b"1"), kfrag(), cache.generation())
    clock.now += 30
    cache.put(key(wrapped=b"2"), kfrag(), cache.generation())
    clock.now += 30
    assert cache.drop_expired() == 1
    assert len(cache) == 1 and cache.get(key(wrapped=b"2")) is not None
    clock.now += 30
    assert cache.drop_expired() == 1
    assert len(cache) == 0


def test_the_oldest_unwrap_goes_first_beyond_max_entries() -> None:
    cache = KfragCache(ttl_s=60, max_entries=2, clock=Clock())
    for wrapped in (b"1", b"2", b"3"):
        cache.put(key(wrapped=wrapped), kfrag(), cache.generation())
    assert cache.get(key(wrapped=b"1")) is None
    assert cache.get(key(wrapped=b"2")) is not None
    assert cache.get(key(wrapped=b"3")) is not None


def test_the_caches_hold_at_most_the_documented_ten_thousand_entries_by_default() -> None:
    """ADR 13: 10,000 unwrapped kfrags and 10,000 served capsules per server process (the
    server builds both with their defaults)."""
    unwrapped, k = KfragCache(clock=Clock()), kfrag()
    for i in range(10_001):
        unwrapped.put(key(wrapped=i.to_bytes(4, "big")), k, unwrapped.generation())
    assert len(unwrapped) == 10_000
    assert unwrapped.get(key(wrapped=(0).to_bytes(4, "big"))) is None
    capsules, (_, capsule) = CapsuleCache(), _capsule()
    for i in range(10_001):
        capsules.remember(i.to_bytes(32, "big"), capsule)
    assert len(capsules) == 10_000


def test_evicting_a_grant_drops_its_entries_only() -> None:
    cache = KfragCache(clock=Clock())
    cache.put(key(ALICE, BOB), kfrag(), cache.generation())
    cache.put(key(ALICE, CAROL), kfrag(), cache.generation())
    assert cache.evict(ALICE, BOB) == 1
    assert cache.get(key(ALICE, BOB)) is None
    assert cache.get(key(ALICE, CAROL)) is not None


def test_an_unwrap_that_raced_a_shredding_is_not_kept() -> None:
    """A request read the stored kfrag, the grant was shredded, then the request's
    unwrap finished: its kfrag must not outlive the shredding in the cache."""
    cache = KfragCache(clock=Clock())
    before = cache.generation()
    cache.evict(ALICE, BOB)
    cache.put(key(), kfrag(), before)
    assert cache.get(key()) is None
    cache.put(key(), kfrag(), cache.generation())
    assert cache.get(key()) is not None


def test_ttl_zero_keeps_nothing_and_clear_empties() -> None:
    none = KfragCache(ttl_s=0, clock=Clock())
    none.put(key(), kfrag(), none.generation())
    assert none.get(key()) is None
    cache = KfragCache(clock=Clock())
    cache.put(key(), kfrag(), cache.generation())
    cache.clear()
    assert len(cache) == 0


def test_the_cache_never_shows_a_kfrag() -> None:
    cache = KfragCache(clock=Clock())
    k = kfrag()
    cache.put(key(), k, cache.generation())
    assert repr(cache) == "KfragCache(entries=1, ttl_s=60.0)"
    assert bytes(k).hex() not in repr(cache)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        KfragCache(ttl_s=-1)
    with pytest.raises(ValueError):
        KfragCache(max_entries=0)


def _capsule() -> tuple[bytes, umbral.Capsule]:
    capsule, _ = umbral.encrypt(umbral.SecretKey.random().public_key(), b"k" * 32)
    return bytes(capsule), capsule


def test_a_remembered_capsule_is_not_parsed_again() -> None:
    cache = CapsuleCache()
    data, _ = _capsule()
    parsed = cache.load(data)
    assert cache.load(data) is not parsed  # not remembered: parsed again
    cache.remember(capsule_hash(data), parsed)
    assert cache.load(data) is parsed


def test_malformed_bytes_are_refused_as_before() -> None:
    cache = CapsuleCache()
    data, capsule = _capsule()
    cache.remember(capsule_hash(data), capsule)
    with pytest.raises(InvalidRequest, match="capsules\\[3\\].capsule is not a valid"):
        cache.load(data[:-1] + bytes([data[-1] ^ 1]), "capsules[3].capsule")


def test_the_capsule_cache_is_bounded_least_recently_used_first_out() -> None:
    cache = CapsuleCache(max_entries=2)
    (a, ca), (b, cb), (c, cc) = _capsule(), _capsule(), _capsule()
    cache.remember(capsule_hash(a), ca)
    cache.remember(capsule_hash(b), cb)
    assert cache.load(a) is ca  # a is now the most recently used
    cache.remember(capsule_hash(c), cc)
    assert len(cache) == 2
    assert cache.load(a) is ca
    assert cache.load(b) is not cb
