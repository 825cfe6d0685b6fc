"""`kmsctl provider probe`'s bounds, checked before any party or chain is reached."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cli.kmsctl import MAX_PROBE_RATE, MAX_PROBE_READERS, MAX_PROBE_SECONDS, _Pacer
from tests.cli.test_account import kmsctl


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seconds", "0", "--seconds must be in"),
        ("--seconds", str(MAX_PROBE_SECONDS + 1), "--seconds must be in"),
        ("--readers", "0", "--readers must be in"),
        ("--readers", str(MAX_PROBE_READERS + 1), "--readers must be in"),
        ("--rate", "0", "--rate must be in"),
        ("--rate", "-5", "--rate must be in"),
        ("--rate", str(MAX_PROBE_RATE * 2), "--rate must be in"),
        ("--rate", "nan", "--rate must be in"),
    ],
)
def test_a_probe_out_of_bounds_is_refused(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    args = ["provider", "probe", "00" * 32, "--seconds", "1", "--out", str(tmp_path / "p")]
    code, _, err = kmsctl(*args, option, value, "--state-dir", str(tmp_path / "none"))
    assert code == 1
    assert message in err
    assert not (tmp_path / "p").exists()


def test_the_pacer_starts_reads_at_most_rate_a_second_from_any_number_of_readers() -> None:
    pacer, starts = _Pacer(rate=50.0), []
    lock = threading.Lock()

    def reader() -> None:
        for _ in range(10):
            pacer.wait_turn()
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    # 40 starts 20 ms apart: the last is at least 39 intervals after the first.
    assert starts[-1] - starts[0] >= 39 * 0.02 - 0.005


def test_a_reader_that_falls_behind_does_not_earn_a_burst() -> None:
    pacer = _Pacer(rate=100.0)
    pacer.wait_turn()
    time.sleep(0.3)  # a slow read: 30 intervals pass
    t0 = time.monotonic()
    for _ in range(5):
        pacer.wait_turn()
    # The first goes at once; the other four wait their 10 ms each.
    assert time.monotonic() - t0 >= 4 * 0.01 - 0.002
