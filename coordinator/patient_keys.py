"""Patients' registered keys, as the coordinator reads them from the registry to
verify capsule fragments: cached, with unknown patients remembered briefly too."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from core.errors import PreconditionFailed
from core.registry_types import PatientInfo
from core.request_auth import Domain


class PatientReader(Protocol):
    """What the coordinator reads from the registry."""

    def get_patient(self, address: str) -> PatientInfo | None: ...

    def signing_domain(self) -> Domain: ...


#: an unregistered patient is asked about again after this long (she may register)
UNKNOWN_PATIENT_TTL_S = 5.0
#: most patients remembered; the oldest go first
MAX_PATIENTS = 100_000


class PatientKeyCache:
    """Patients' registered keys, read from the chain at most once per TTL. Unknown
    patients are remembered too (for :data:`UNKNOWN_PATIENT_TTL_S`), so repeated requests
    naming one made-up patient cost one chain read per few seconds; each distinct made-up
    patient still costs a read (what bounds those is the requester's and its address's
    admission budgets, charged before the lookup: service.py). The memory is bounded
    (:data:`MAX_PATIENTS`, the least recently read go first). Lookups of one patient
    that meet while her read is on its way share it: a burst of reads as her entry
    expires costs one chain read, not one each."""

    def __init__(
        self,
        registry: PatientReader,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, PatientInfo | None]] = OrderedDict()
        #: chain reads on their way, by patient
        self._reading: dict[str, asyncio.Future[PatientInfo | None]] = {}

    async def get(self, address: str) -> PatientInfo:
        now = self._clock()
        hit = self._entries.get(address)
        if hit is not None and now - hit[0] < (self._ttl_s if hit[1] else UNKNOWN_PATIENT_TTL_S):
            info = hit[1]
        else:
            reading = self._reading.get(address)
            if reading is None:
                reading = asyncio.ensure_future(self._read(address, now))
                self._reading[address] = reading
                reading.add_done_callback(lambda _done: self._reading.pop(address, None))
            # Shielded: a caller that gives up does not cancel the read the others share.
            info = await asyncio.shield(reading)
        if info is None:
            raise PreconditionFailed("patient is not registered in the registry")
        return info

    async def _read(self, address: str, now: float) -> PatientInfo | None:
        info = await asyncio.to_thread(self._registry.get_patient, address)
        self._entries[address] = (now, info)
        self._entries.move_to_end(address)
        while len(self._entries) > MAX_PATIENTS:
            self._entries.popitem(last=False)
        return info
