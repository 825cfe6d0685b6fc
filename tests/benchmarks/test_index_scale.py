"""The index scale benchmark's arithmetic and its update of latest.json (no chain)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from benchmarks.index_scale import add_to_latest, extrapolated


def size(patients: int, restart_s: float, replay_s: float) -> dict[str, Any]:
    return {
        "patients": patients,
        "restart_from_snapshot_s": restart_s,
        "full_replay_s": replay_s,
        "index_kb_per_patient": 0.4,
        "snapshot_bytes_per_patient": 250.0,
    }


def test_a_million_is_on_the_line_through_the_two_sizes() -> None:
    million = extrapolated([size(10_000, 0.2, 20.0), size(100_000, 1.1, 200.0)])
    assert million["restart_from_snapshot_s"] == pytest.approx(1.1 + 0.00001 * 900_000)
    assert million["full_replay_s"] == pytest.approx(2000.0)
    assert million["index_mb"] == pytest.approx(0.4 * 1_000_000 / 1024)
    # Noise that tilts the line down does not make a million cheaper than 100 000.
    flat = extrapolated([size(10_000, 0.5, 20.0), size(100_000, 0.4, 200.0)])
    assert flat["restart_from_snapshot_s"] == pytest.approx(0.4)


def test_latest_json_keeps_its_keys_and_gains_the_headline_figures(tmp_path: Path) -> None:
    latest = tmp_path / "latest.json"
    latest.write_text(json.dumps({"cluster_p50_ms": 11.5, "schema": 3}))
    results = {"sizes": [size(10_000, 0.2, 20.0), size(100_000, 1.234567, 200.0)]}
    add_to_latest(latest, results)
    document = json.loads(latest.read_text())
    assert document["cluster_p50_ms"] == 11.5 and document["schema"] == 3
    assert document["index_kb_per_patient"] == 0.4
    assert document["restart_s_100k_patients"] == 1.235
    assert document["index_scale"] == results


def test_a_harness_run_keeps_the_index_figures_it_does_not_measure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest = tmp_path / "latest.json"
    latest.write_text(json.dumps({"cluster_p50_ms": 11.5}))
    add_to_latest(latest, {"sizes": [size(10_000, 0.2, 20.0), size(100_000, 0.5, 200.0)]})
    monkeypatch.setattr(report, "render", lambda *args, **kwargs: None)  # no plot here
    report.write({"cluster_p50_ms": 9.0, "index_kb_per_patient": 0.3}, tmp_path, readme=False)
    document = json.loads(latest.read_text())
    assert document["cluster_p50_ms"] == 9.0  # the new run's own figure
    assert document["index_kb_per_patient"] == 0.3  # measured by this run: not replaced
    assert document["restart_s_100k_patients"] == 0.5  # not measured by it: kept
    assert document["index_scale"]["sizes"][1]["patients"] == 100_000
