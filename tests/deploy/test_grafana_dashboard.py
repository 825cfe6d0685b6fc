"""deploy/grafana/medkms-dashboard.json queries only series the node and coordinator
export, in PromQL that Prometheus parses, laid out without overlapping panels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from coordinator import metrics as coordinator_metrics
from kms_node import metrics as node_metrics
from kms_node.anchoring import AnchorOutcome
from kms_node.server import READ_METHODS
from proto.stubs import NODE_SERVICE

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD: dict[str, Any] = json.loads(
    (ROOT / "deploy" / "grafana" / "medkms-dashboard.json").read_text()
)


def _panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def _queries() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _exported_series() -> set[str]:
    node_metrics.start_at_zero(list(NODE_SERVICE.methods_by_name), list(AnchorOutcome))
    coordinator_metrics.start_at_zero(["node-1"])
    names: set[str] = set()
    for registry in (node_metrics.REGISTRY, coordinator_metrics.REGISTRY):
        exposed = generate_latest(registry).decode()
        names |= set(re.findall(r"^(kms_[a-z_]+)", exposed, re.MULTILINE))
    return names


def test_every_query_names_only_exported_series() -> None:
    exported = _exported_series()
    named = {m for q in _queries() for m in re.findall(r"kms_[a-z_]+", q)}
    assert named, "the dashboard queries nothing"
    assert named <= exported, sorted(named - exported)


def test_the_dashboard_shows_what_operators_need() -> None:
    named = {m for q in _queries() for m in re.findall(r"kms_[a-z_]+", q)}
    for needed in (
        "kms_coordinator_requests_total",
        "kms_coordinator_request_duration_seconds_bucket",
        "kms_coordinator_node_in_rotation",
        "kms_node_requests_total",
        "kms_node_decisions_total",
        "kms_node_chain_index_block",
        "kms_node_audit_anchors_total",
        "kms_node_audit_log_diverges_from_anchor",
    ):
        assert needed in named, needed


def test_every_node_read_panel_shows_every_read_method() -> None:
    """A panel of the node's reads names all three read methods: since ADR 16 most reads
    under load arrive as ``ReencryptMany``, and a panel that names only ``Reencrypt``
    shows only the lone ones."""
    reads = [
        set(value.split("|"))
        for query in _queries()
        for matchers in re.findall(r"kms_node_[a-z_]+\{([^}]*)\}", query)
        for value in re.findall(r'method=~?"([^"]*)"', matchers)
        if set(value.split("|")) & set(READ_METHODS)
    ]
    assert reads, "no panel shows the node's reads"
    for methods in reads:
        assert set(READ_METHODS) <= methods, methods


def test_every_query_is_promql_that_prometheus_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus): run `make setup`"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(_queries()):
        # Grafana fills in $__rate_interval; Prometheus needs a duration there.
        expr = query.replace("$__rate_interval", "5m")
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_panels_have_a_title_a_datasource_and_their_own_place() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        assert panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"]
