"""deploy/prometheus-alerts.yml names only what a node exports: its metrics, the outcome
and decision labels it sets, the reason codes its policy gives, its RPC methods."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from core.audit import DECISIONS
from core.policy import Reason
from kms_node.anchoring import AnchorOutcome
from proto.stubs import NODE_SERVICE

ROOT = Path(__file__).resolve().parents[2]
RULES = (ROOT / "deploy" / "prometheus-alerts.yml").read_text()
METRICS_SOURCE = (ROOT / "kms_node" / "metrics.py").read_text()


def _values(metric: str, label: str) -> set[str]:
    """Every value the rules give ``label`` in selectors of ``metric`` (``=`` or ``=~``
    with alternatives)."""
    found: set[str] = set()
    for matchers in re.findall(metric + r"\{([^}]*)\}", RULES):
        for value in re.findall(label + r'=~?"([^"]*)"', matchers):
            found |= set(value.split("|"))
    return found


def test_every_metric_named_is_one_the_node_declares() -> None:
    declared = set(re.findall(r'"(kms_node_[a-z_]+)"', METRICS_SOURCE))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"kms_node_[a-z_]+", RULES)}
    assert used, "the rules name no metric"
    assert used <= declared, sorted(used - declared)


def test_every_label_value_is_one_the_node_sets() -> None:
    statuses = {"ok"} | {code.name.lower() for code in grpc.StatusCode}
    outcomes = _values("kms_node_requests_total", "outcome")
    assert outcomes and outcomes <= statuses, outcomes - statuses
    anchors = _values("kms_node_audit_anchors_total", "outcome")
    assert anchors and anchors <= {str(o) for o in AnchorOutcome}
    assert _values("kms_node_decisions_total", "decision") <= set(DECISIONS)
    reasons = _values("kms_node_decisions_total", "reason")
    assert reasons and reasons <= set(Reason), reasons - set(Reason)
    methods = _values("kms_node_request_duration_seconds_bucket", "method")
    assert methods and methods <= set(NODE_SERVICE.methods_by_name)


def test_every_rule_has_an_expression_a_severity_and_a_summary() -> None:
    rules = RULES.split("- alert: ")[1:]
    assert len(rules) >= 5
    for rule in rules:
        name = rule.split()[0]
        assert "expr:" in rule and "severity:" in rule and "summary:" in rule, name
        assert re.fullmatch(r"KmsNode[A-Za-z]+", name), name
