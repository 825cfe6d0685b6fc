"""Revocation latency: from the revoke transaction being mined to the first
refusal a grantee sees through the coordinator.

Each trial grants a fresh doctor, checks a DEK request is served, revokes,
and from the moment the SDK holds the mined receipt polls the coordinator
every ``poll_s`` until a request is refused with PERMISSION_DENIED. With instant
mining anvil mines each transaction as it arrives, and the SDK polls for the mined
transaction every 50 ms (checking at once first), so "mined" is known to within
that. Nodes judge from a grant index that follows the registry's events every
``chain_poll_interval_s`` (ADR 2), so the first refusal comes within about one poll
of the revocation being mined (plus ``k`` blocks with a confirmation depth, ADR 12).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.workload import Workload
from core.errors import AccessDenied, KmsError

POLL_S = 0.02
GRANT_POLL_S = 0.5
TIMEOUT_S = 15.0


def trial(
    workload: Workload, number: int, *, poll_s: float = POLL_S, timeout_s: float = TIMEOUT_S
) -> dict[str, Any]:
    doctor = workload.new_identity(f"dr-revoked-{number}", provider=True)
    workload.grant(doctor)
    path = workload.dek_path([doctor])
    try:
        # Served before the revocation, or the trial means nothing. (With a confirmation
        # depth the grant is served once k blocks deep: wait for it, asking slowly, since
        # a refusal costs a requester ten times a request's budget.)
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                path(0)
                break
            except AccessDenied:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(GRANT_POLL_S)
        sent = time.perf_counter()
        # The registry call returns with the mined receipt (PatientClient.revoke
        # would then also fetch its block, which is not part of the latency).
        workload.registry.revoke_access(workload.patient.identity.account, doctor.address)
        mined = time.perf_counter()
        served_after, other_errors, polls = 0, 0, 0
        refused: float | None = None
        reason = ""
        while time.perf_counter() - mined < timeout_s:
            started = time.perf_counter()
            polls += 1
            try:
                path(polls)
                served_after += 1
            except AccessDenied as e:
                refused = time.perf_counter()
                reason = e.message
                break
            except KmsError:
                other_errors += 1
            time.sleep(max(0.0, started + poll_s - time.perf_counter()))
    finally:
        path.close()
    return {
        "revocation_s": None if refused is None else refused - mined,
        "sent_to_refused_s": None if refused is None else refused - sent,
        "revoke_tx_s": mined - sent,
        "polls": polls,
        "served_after_revoke": served_after,
        "other_errors": other_errors,
        "refusal": reason[:200],
    }
