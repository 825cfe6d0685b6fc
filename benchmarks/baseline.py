"""The baseline: the bare umbral-pre library doing the cluster's cryptography in
this one process, on one core, with nothing around it.

- re-encryption rate: ``reencrypt`` of a capsule with a verified kfrag;
- wire re-encryption rate: the same from the capsule's bytes to the cfrag's, as a
  node must do it (``Capsule.from_bytes`` checks the capsule: point decompression
  and a scalar multiplication), which no implementation that takes capsules from
  the network can avoid;
- the crypto-only bound of one m-of-n DEK request: m re-encryptions, m cfrag
  verifications (parsed from bytes, as they arrive) and one
  ``decrypt_reencrypted``, timed together per request.

Rates are per CPU-second of this process (``time.process_time``), which on an
otherwise idle machine equals wall time on one core; both are reported.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import umbral_pre as umbral

from benchmarks import stats

DEK_SIZE = 32


def _timed(
    op: Callable[[], object], duration_s: float, max_ops: int
) -> tuple[list[float], float, float]:
    """Per-op wall latencies, total CPU seconds and total wall seconds."""
    latencies: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + duration_s
    while len(latencies) < max_ops:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        op()
        latencies.append(time.perf_counter() - t0)
    return latencies, time.process_time() - cpu0, time.perf_counter() - wall0


def _op_result(
    latencies: list[float], cpu_s: float, wall_s: float, units_per_op: int = 1
) -> dict[str, Any]:
    summary = stats.summarize(latencies, wall_s)
    ops = len(latencies)
    return {
        **summary.as_dict(),
        "cpu_ms_per_op": cpu_s / ops * 1000.0,
        "rate_per_cpu_s": stats.per_cpu_second(ops * units_per_op, cpu_s),
        "rate_per_wall_s": ops * units_per_op / wall_s,
        "cdf_ms": stats.cdf_ms(latencies),
    }


class _Keys:
    """A patient (delegating), a grantee (receiving), an encapsulated DEK and
    m-of-n kfrags, as the cluster holds them."""

    def __init__(self, threshold: int, shares: int) -> None:
        self.threshold = threshold
        self.delegating = umbral.SecretKey.random()
        self.receiving = umbral.SecretKey.random()
        signer = umbral.Signer(umbral.SecretKey.random())
        self.verifying_pk = signer.verifying_key()
        self.delegating_pk = self.delegating.public_key()
        self.receiving_pk = self.receiving.public_key()
        self.capsule, self.encrypted_dek = umbral.encrypt(self.delegating_pk, b"\x07" * DEK_SIZE)
        self.kfrags = umbral.generate_kfrags(
            delegating_sk=self.delegating,
            receiving_pk=self.receiving_pk,
            signer=signer,
            threshold=threshold,
            shares=shares,
            sign_delegating_key=True,
            sign_receiving_key=True,
        )

    def verify(self, cfrag: bytes) -> umbral.VerifiedCapsuleFrag:
        return umbral.CapsuleFrag.from_bytes(cfrag).verify(
            self.capsule, self.verifying_pk, self.delegating_pk, self.receiving_pk
        )

    def decrypt(self, verified: list[umbral.VerifiedCapsuleFrag]) -> bytes:
        dek = umbral.decrypt_reencrypted(
            self.receiving, self.delegating_pk, self.capsule, verified, self.encrypted_dek
        )
        if dek is None:
            raise ValueError("the capsule fragments did not open the DEK")
        return bytes(dek)

    def request(self) -> bytes:
        """What one m-of-n DEK request must compute, wherever it runs: m
        re-encryptions, m cfrag verifications, one decryption."""
        cfrags = [bytes(umbral.reencrypt(self.capsule, k)) for k in self.kfrags[: self.threshold]]
        return self.decrypt([self.verify(c) for c in cfrags])


MAX_OPS = 100_000


def bound_ms(threshold: int, shares: int, *, duration_s: float) -> float:
    """CPU milliseconds of one ``threshold``-of-``shares`` request's crypto."""
    keys = _Keys(threshold, shares)
    keys.request()
    latencies, cpu_s, _ = _timed(keys.request, duration_s, MAX_OPS)
    return cpu_s / len(latencies) * 1000.0


def app_share_ms(threshold: int, shares: int, *, duration_s: float) -> dict[str, float]:
    """CPU milliseconds of the app's share of one request's crypto: ``threshold`` cfrag
    verifications (parsed from bytes, as they arrive) and one ``decrypt_reencrypted``,
    each timed alone and both together."""
    keys = _Keys(threshold, shares)
    cfrags = [bytes(umbral.reencrypt(keys.capsule, k)) for k in keys.kfrags[:threshold]]
    verified = [keys.verify(c) for c in cfrags]

    def verify() -> object:
        return [keys.verify(c) for c in cfrags]

    def decrypt() -> object:
        return keys.decrypt(verified)

    def both() -> object:
        return keys.decrypt([keys.verify(c) for c in cfrags])

    result = {}
    for name, op in (("verify_ms", verify), ("decrypt_ms", decrypt), ("total_ms", both)):
        op()
        latencies, cpu_s, _ = _timed(op, duration_s, MAX_OPS)
        result[name] = cpu_s / len(latencies) * 1000.0
    return result


def _reencrypt_for(duration_s: float) -> tuple[int, float]:
    """Re-encryptions done in ``duration_s`` of wall time, and that time."""
    keys = _Keys(3, 5)
    kfrag = keys.kfrags[0]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        umbral.reencrypt(keys.capsule, kfrag)
        done += 1
    return done, time.perf_counter() - start


def parallel_reencrypt_rate(processes: int, *, duration_s: float) -> float:
    """Re-encryptions per wall second of ``processes`` busy processes at once:
    what the machine really delivers (shared or throttled cores show here)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding gRPC state
    with context.Pool(processes) as pool:
        results = pool.map(_reencrypt_for, [duration_s] * processes)
    return sum(done / wall for done, wall in results)


def measure(*, duration_s: float, threshold: int, shares: int) -> dict[str, Any]:
    """Each operation for about ``duration_s``, then the whole request as long."""
    keys = _Keys(threshold, shares)
    kfrag = keys.kfrags[0]
    cfrags = [bytes(umbral.reencrypt(keys.capsule, k)) for k in keys.kfrags[:threshold]]
    verified = [keys.verify(c) for c in cfrags]

    capsule_bytes = bytes(keys.capsule)

    def reencrypt() -> object:
        return umbral.reencrypt(keys.capsule, kfrag)

    def reencrypt_wire() -> bytes:
        return bytes(umbral.reencrypt(umbral.Capsule.from_bytes(capsule_bytes), kfrag))

    def verify() -> object:
        return keys.verify(cfrags[0])

    def decrypt() -> object:
        return keys.decrypt(verified)

    for op in (reencrypt, reencrypt_wire, verify, decrypt, keys.request):
        op()  # first-call costs (allocations, table set-up) out of the way
    ops = {
        "reencrypt": _op_result(*_timed(reencrypt, duration_s, MAX_OPS)),
        "reencrypt_from_bytes": _op_result(*_timed(reencrypt_wire, duration_s, MAX_OPS)),
        "cfrag_verify": _op_result(*_timed(verify, duration_s, MAX_OPS)),
        "decrypt_reencrypted": _op_result(*_timed(decrypt, duration_s, MAX_OPS)),
    }
    bound = _op_result(*_timed(keys.request, duration_s, MAX_OPS))
    return {
        "threshold": threshold,
        "shares": shares,
        "reencrypt_rate_per_core": ops["reencrypt"]["rate_per_cpu_s"],
        "reencrypt_rate_per_wall_s": ops["reencrypt"]["rate_per_wall_s"],
        "wire_reencrypt_rate_per_core": ops["reencrypt_from_bytes"]["rate_per_cpu_s"],
        "bound_ms": bound["cpu_ms_per_op"],
        "bound_request": bound,
        "ops": ops,
    }
