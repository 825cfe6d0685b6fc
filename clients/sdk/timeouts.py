"""How long an SDK client waits for the coordinator, as a value.

``PatientClient`` and ``ProviderClient`` are built alike, as an httpx client is: who acts
(an ``Identity``), the registry read and written (``core.registry_interface``), the blob
store, and how to reach the coordinator as values: its address, the ``Transport`` that
secures the channel, and these ``Timeouts``. Each client opens its own channel and closes
it on ``close()`` or at the end of a ``with`` block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from core.errors import ConfigurationError


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for the coordinator's answer to each kind of call. A call waits
    within its timeout for the channel to be ready, so a coordinator that is restarting
    is waited for rather than failed at once (channels retry their connection at most a
    second apart: ``proto.rpc.RECONNECT_OPTIONS``)."""

    #: work the coordinator fans out to the nodes: enrolling kfrags, re-encrypting
    fan_out_s: float = 10.0
    #: the coordinator's report of each node's state (``PatientClient.cluster_status``)
    status_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"timeouts: {f.name} must be a positive number")


#: what a client waits when built without ``timeouts``
DEFAULT_TIMEOUTS: Final = Timeouts()
