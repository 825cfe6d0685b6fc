"""The coordinator's cache of patients' registered keys: what a patient costs in chain
reads. A known patient is read once per ``patient_cache_s``, an unknown one once per
UNKNOWN_PATIENT_TTL_S, but each DISTINCT patient costs a read: the cache does not stop
made-up patients, the admission budgets charged before the lookup do (service.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator import patient_keys
from coordinator.patient_keys import UNKNOWN_PATIENT_TTL_S, PatientKeyCache
from core.errors import PreconditionFailed
from core.registry_types import PatientInfo
from core.request_auth import Domain

KNOWN = "0x" + "aa" * 20
TTL_S = 60.0


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRegistry:
    """Knows the patients in ``known``; counts every chain read, by address."""

    def __init__(self, *known: str) -> None:
        self.known = set(known)
        self.reads: list[str] = []

    def get_patient(self, address: str) -> PatientInfo | None:
        self.reads.append(address)
        if address not in self.known:
            return None
        return PatientInfo(address, (), b"\x02" + b"\x01" * 32)

    def signing_domain(self) -> Domain:
        raise AssertionError("not read by the cache")


def made_up(i: int) -> str:
    return "0x" + f"{i:040x}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CountingRegistry:
    return CountingRegistry(KNOWN)


@pytest.fixture
def cache(registry: CountingRegistry, clock: Clock) -> PatientKeyCache:
    return PatientKeyCache(registry, TTL_S, clock=clock)


def get(cache: PatientKeyCache, address: str) -> PatientInfo:
    return asyncio.run(cache.get(address))


def refused(cache: PatientKeyCache, address: str) -> None:
    with pytest.raises(PreconditionFailed, match="patient is not registered in the registry"):
        get(cache, address)


def test_one_unknown_patient_costs_one_read_per_negative_cache_time(
    cache: PatientKeyCache, registry: CountingRegistry, clock: Clock
) -> None:
    stranger = made_up(1)
    refused(cache, stranger)
    clock.now += UNKNOWN_PATIENT_TTL_S - 0.01
    refused(cache, stranger)  # remembered as unknown: no second read
    assert registry.reads == [stranger]
    clock.now += 0.01  # the negative entry has lapsed (she may have registered)
    refused(cache, stranger)
    assert registry.reads == [stranger, stranger]


def test_an_unknown_patient_who_registers_is_served_once_her_entry_lapses(
    cache: PatientKeyCache, registry: CountingRegistry, clock: Clock
) -> None:
    newcomer = made_up(2)
    refused(cache, newcomer)
    registry.known.add(newcomer)
    refused(cache, newcomer)  # still remembered as unknown
    clock.now += UNKNOWN_PATIENT_TTL_S
    assert get(cache, newcomer).address == newcomer
    assert registry.reads == [newcomer, newcomer]


def test_each_distinct_made_up_patient_costs_a_read(
    cache: PatientKeyCache, registry: CountingRegistry
) -> None:
    """The cache saves nothing against made-up patients that differ: one read each."""
    for i in range(50):
        refused(cache, made_up(100 + i))
    assert len(registry.reads) == 50


def test_a_known_patient_is_cached_for_its_own_time(
    cache: PatientKeyCache, registry: CountingRegistry, clock: Clock
) -> None:
    assert get(cache, KNOWN).address == KNOWN
    clock.now += UNKNOWN_PATIENT_TTL_S + 1  # well past the unknown patients' time
    assert get(cache, KNOWN).address == KNOWN
    clock.now = 1000.0 + TTL_S - 0.01
    get(cache, KNOWN)
    assert registry.reads == [KNOWN]
    clock.now = 1000.0 + TTL_S
    get(cache, KNOWN)
    assert registry.reads == [KNOWN, KNOWN]


def test_the_cache_is_bounded_and_forgets_the_oldest_read_first(
    cache: PatientKeyCache,
    registry: CountingRegistry,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(patient_keys, "MAX_PATIENTS", 3)
    get(cache, KNOWN)
    for i in range(3):  # three made-up patients push the known one out
        clock.now += 0.001
        refused(cache, made_up(i))
    assert registry.reads == [KNOWN, made_up(0), made_up(1), made_up(2)]
    get(cache, KNOWN)  # forgotten: read again, and made_up(0), now the oldest, goes
    assert registry.reads[-1] == KNOWN
    for i in (1, 2):
        refused(cache, made_up(i))  # still remembered
    assert len(registry.reads) == 5
    refused(cache, made_up(0))
    assert registry.reads[-1] == made_up(0) and len(registry.reads) == 6


class GatedRegistry(CountingRegistry):
    """Its chain reads wait until ``release`` is set (they run in threads)."""

    def __init__(self, *known: str) -> None:
        super().__init__(*known)
        self.release = threading.Event()

    def get_patient(self, address: str) -> PatientInfo | None:
        assert self.release.wait(10)
        return super().get_patient(address)


def test_lookups_that_meet_share_one_read_and_one_giving_up_cancels_none(clock: Clock) -> None:
    """Ten reads of a patient whose entry is not cached, while her read is on its way:
    one chain read; a caller that gives up meanwhile does not cancel it for the others."""
    registry = GatedRegistry(KNOWN)
    cache = PatientKeyCache(registry, TTL_S, clock=clock)

    async def burst() -> list[PatientInfo]:
        waiting = [asyncio.ensure_future(cache.get(KNOWN)) for _ in range(10)]
        await asyncio.sleep(0)  # every lookup has started and met the first's read
        waiting[0].cancel()
        registry.release.set()
        return await asyncio.gather(*waiting[1:])

    found = asyncio.run(burst())
    assert [info.address for info in found] == [KNOWN] * 9
    assert registry.reads == [KNOWN]
    assert get(cache, KNOWN).address == KNOWN  # and it is cached
    assert registry.reads == [KNOWN]
