"""The coordinator's cache of patients' registered keys: what a patient costs in chain
reads. A known patient is read once per ``patient_cache_s``, an unknown one once per
UNKNOWN_PATIENT_TTL_S, but each DISTINCT patient costs a read: the cache does not stop
made-up patients, the admission budgets charged before the lookup do (service.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator import patient_keys
from coordinator.admission import Admission
from coordinator.patient_keys import UNKNOWN_PATIENT_TTL_S, PatientKeyCache
from coordinator.settings import CoordinatorSettings
from core.errors import PreconditionFailed, ResourceExhausted
from core.rate_limit import REFUSAL_COST
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


# --- what bounds made-up patients: the admission budgets, with their defaults ----------------

DEFAULTS = CoordinatorSettings
PEER = "6.6.6.6"


def default_admission(clock: Clock) -> Admission:
    return Admission(
        requester_rate_per_s=DEFAULTS.requester_rate_per_s,
        requester_burst=DEFAULTS.requester_burst,
        peer_refusals_per_s=DEFAULTS.peer_refusals_per_s,
        peer_refusal_burst=DEFAULTS.peer_refusal_burst,
        served_memory_s=DEFAULTS.served_memory_s,
        clock=clock,
    )


def made_up_at_once(
    gate: Admission, cache: PatientKeyCache, requesters: list[str], registry: CountingRegistry
) -> int:
    """Calls sent at once, each naming a new made-up patient, handled as service.py's
    ``_admit`` handles them: all admitted before any lookup, each lookup refused and
    settled as a refused request. How many got through to a chain read."""
    tickets = []
    for requester in requesters:
        try:
            tickets.append(gate.admit(requester, PEER, 1))
        except ResourceExhausted:
            break
    for ticket in tickets:
        refused(cache, made_up(10_000 + len(registry.reads)))
        gate.settle(ticket, served=0, refused=1)
    return len(tickets)


def test_requesters_not_served_lately_get_about_5_made_up_patients_a_second_per_address(
    registry: CountingRegistry, cache: PatientKeyCache, clock: Clock
) -> None:
    """Throw-away keys from one address send all they can every 10 ms for 10 s. Each not
    served lately spends one of the address's refusals (peer_refusals_per_s = 5/s, after
    a burst of peer_refusal_burst), whatever its own budget: 20 + 5 x 10 chain reads."""
    gate = default_admission(clock)
    start = clock.now
    for tick in range(1000):
        clock.now = start + tick / 100
        made_up_at_once(gate, cache, [f"0xkey-{tick}-{i}" for i in range(30)], registry)
    expected = DEFAULTS.peer_refusal_burst + DEFAULTS.peer_refusals_per_s * 10
    assert DEFAULTS.peer_refusals_per_s == 5
    assert abs(len(registry.reads) - expected) <= 1


def test_a_requester_served_lately_gets_at_most_about_25_made_up_patients_a_second(
    registry: CountingRegistry, cache: PatientKeyCache, clock: Clock
) -> None:
    """A served requester is exempt from its address's budget and admitted at a single
    request's price (1 token, requester_burst = 100 at once); each made-up patient is
    then charged as refused (REFUSAL_COST = 10 in all), down to one burst of debt. Its
    best is a burst of 100 calls at once whenever the bucket is full again: from -100 to
    +100 at requester_rate_per_s = 50/s takes 4 s, so 100 per 4 s = rate / 2 = 25/s."""
    gate = default_admission(clock)
    gate.settle(gate.admit("0xdoctor", PEER, 1), served=1, refused=0)
    burst, rate = DEFAULTS.requester_burst, DEFAULTS.requester_rate_per_s
    assert burst * (REFUSAL_COST - 1) >= burst  # one burst's refusals reach the debt bound
    refill_s = 2 * burst / rate
    start = clock.now + 1  # the bucket full again after its served request
    bursts = []
    for n in range(5):
        clock.now = start + n * refill_s
        bursts.append(made_up_at_once(gate, cache, ["0xdoctor"] * 2 * burst, registry))
    assert bursts == [burst] * 5
    assert len(registry.reads) / (5 * refill_s) == rate / 2 == 25
    # A burst sent before the bucket is full again gets less, not more: 25/s is the most.
    clock.now += refill_s - 0.5
    assert made_up_at_once(gate, cache, ["0xdoctor"] * 2 * burst, registry) < burst
