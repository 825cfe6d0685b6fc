"""``report.html`` as a person sees it: rendered by headless Chromium, then read from the DOM
Chromium built (and, once, from a screenshot)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from clients.audit.auditor import ClusterReport
from clients.audit.report_html import (
    CONTENT_SECURITY_POLICY,
    MAX_FAILING,
    MAX_REASONS,
    MAX_SPANS,
    MAX_TEXT,
    refusal_reasons,
    report_html,
    time_spans,
)
from core.audit_findings import Check, EntryResult, NodeReport, Problem
from core.formats import iso_utc
from tests.core.test_audit_verify import FIRST_BLOCK, NODE, T0, Node, make_entry
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)
from tests.headless_chromium import Dom, Element, dump_dom, png_pixels, screenshot

pytestmark = pytest.mark.chromium

REGISTRY = "0x" + "ab" * 20
CHAIN_ID = 31337
AUDITED_AT = T0 + 3600


def cluster(*nodes: NodeReport, registry: str = REGISTRY) -> ClusterReport:
    return ClusterReport(registry, 2000, nodes, 0.5, {}, 7)


def three_nodes(node: Node) -> ClusterReport:
    """node-1 failed (granted after revocation), node-2 passed, node-3 not read."""
    passed = node.verify()
    node.chain.revoked_at = FIRST_BLOCK + 30
    failed = node.verify()
    unread = NodeReport("node-3", None, (), 0, (), (), could_not_read=("the node did not answer",))
    return cluster(failed, dataclasses.replace(passed, node_id="node-2"), unread)


def rendered(report: ClusterReport, tmp_path: Path) -> tuple[Path, Dom]:
    page = tmp_path / "report.html"
    page.write_text(report_html(report, audited_at=AUDITED_AT, chain_id=CHAIN_ID))
    return page, dump_dom(page)


def sections(dom: Dom) -> dict[str, Element]:
    return {s.find("h2", "node-id").text(): s for s in dom.find_all("section", "node")}


def field(section: Element, name: str) -> str:
    for row in section.find("table", "fields").find_all("tr"):
        if row.find("th").text() == name:
            return row.find("td").text()
    raise AssertionError(f"no field {name!r}")


def synthetic(entries: list[EntryResult], node_id: str = NODE) -> NodeReport:
    problems = tuple(p for r in entries for p in r.problems)
    return NodeReport(node_id, None, tuple(entries), 0, problems, ())


def test_each_node_shows_its_verdict_entries_anchors_and_first_failure(
    node: Node, tmp_path: Path
) -> None:
    _, dom = rendered(three_nodes(node), tmp_path)

    header = dom.find("table", "fields").text()
    assert iso_utc(AUDITED_AT) in header and str(CHAIN_ID) in header and REGISTRY in header
    shown = sections(dom)
    assert list(shown) == ["node-1", "node-2", "node-3"]
    verdicts = {n: s.find("span", "verdict") for n, s in shown.items()}
    assert {n: (v.text(), v.classes()) for n, v in verdicts.items()} == {
        "node-1": ("failed", {"verdict", "fail"}),
        "node-2": ("passed", {"verdict", "pass"}),
        "node-3": ("could not read", {"verdict", "unread"}),
    }
    failed = shown["node-1"]
    assert field(failed, "entries") == "40 (32 granted, 8 refused)"
    assert (
        field(failed, "anchored") == f"32 entries in block {FIRST_BLOCK + 1001} (2 anchors checked)"
    )
    assert field(failed, "first failure") == (
        "entry 30 (request req-30): granted, but at block 130: grant has been revoked by the "
        "patient"
    )
    assert field(shown["node-2"], "first failure") == "none"
    assert field(shown["node-3"], "anchored") == "no anchor verified"
    assert field(shown["node-3"], "first failure") == "could not read: the node did not answer"
    rows = failed.find("table", "failing").find_all("tr")[1:]
    assert len(rows) == 8  # entries 30 to 39 but the two denials
    assert [c.text() for c in rows[0].find_all("td")][:5] == [
        "30",
        "req-30",
        iso_utc(T0 + 30),
        "granted",
        "granted",
    ]
    assert shown["node-2"].find_all("table", "failing") == []
    # The overview at the top says the same, one row per node.
    overview = dom.find("table", "overview").find_all("tr")[1:]
    assert [(r.find("td").text(), r.find("span", "verdict").text()) for r in overview] == [
        ("node-1", "failed"),
        ("node-2", "passed"),
        ("node-3", "could not read"),
    ]


def test_the_page_says_could_not_read_when_no_check_failed(node: Node, tmp_path: Path) -> None:
    unread = NodeReport("node-2", None, (), 0, (), (), could_not_read=("the node did not answer",))
    _, dom = rendered(cluster(node.verify(), unread), tmp_path)
    badge = dom.find("h1").find("span", "verdict")
    assert (badge.text(), badge.classes()) == ("could not read", {"verdict", "unread"})


def test_the_bars_count_what_the_log_holds(node: Node, tmp_path: Path) -> None:
    node.chain.revoked_at = FIRST_BLOCK + 30
    report = node.verify()
    _, dom = rendered(cluster(report), tmp_path)

    chart = dom.find("svg", "decisions")
    granted, refused = chart.find_all("rect", "granted"), chart.find_all("rect", "refused")
    assert sum(int(r.attrs["data-count"]) for r in granted) == report.granted == 32
    assert sum(int(r.attrs["data-count"]) for r in refused) == report.denied == 8
    # 40 entries one second apart: 20 spans of 2 s, each bar as tall as its count
    spans = time_spans(report)
    assert len(spans) == 20 and len({r.attrs["x"] for r in granted + refused}) == 20
    peak = max(s.granted + s.refused for s in spans)
    for bar in granted + refused:
        assert float(bar.attrs["height"]) == pytest.approx(
            130 * int(bar.attrs["data-count"]) / peak, abs=0.06
        )
    (reason,) = dom.find("svg", "refusals").find_all("rect", "refusal")
    assert reason.attrs["data-count"] == "8"
    assert "no_grant" in dom.find("svg", "refusals").text()


def test_time_spans_are_at_most_24_and_hold_every_decision() -> None:
    entries = [EntryResult(i, make_entry(i, time=T0 + i * i * 37), f"req-{i}") for i in range(200)]
    spans = time_spans(synthetic(entries))
    assert len(spans) == MAX_SPANS
    assert spans[0].start == T0 and spans[-1].end >= T0 + 199 * 199 * 37
    for entry in (r.entry for r in entries):
        assert entry is not None
        (span,) = [s for s in spans if s.start <= entry.time <= s.end]
    assert sum(s.granted for s in spans) == 160 and sum(s.refused for s in spans) == 40


def test_many_refusal_reasons_end_in_one_other_bar() -> None:
    entries = [
        EntryResult(
            i, dataclasses.replace(make_entry(4), reason_code=f"reason_{i % 20}"), f"req-{i}"
        )
        for i in range(100)
    ]
    reasons = refusal_reasons(synthetic(entries))
    assert len(reasons) == MAX_REASONS
    assert reasons[-1] == ("9 other reasons", 45)
    assert sum(n for _, n in reasons) == 100


HOSTILE_ID = '<script>alert(1)</script>"\' onmouseover="alert(2)" </style>'
CONTROLS = "bell\x07 escape\x1b[31m rtl\u202etxt.exe nul\x00"
HUGE = "A" * 10_000


def test_hostile_strings_are_inert_escaped_and_cut(tmp_path: Path) -> None:
    entries = [
        EntryResult(0, None, HOSTILE_ID, (Problem(Check.FORMAT, HUGE, 0),)),
        EntryResult(1, None, CONTROLS, (Problem(Check.FORMAT, "</table><b>bold</b>", 1),)),
    ]
    hostile = dataclasses.replace(synthetic(entries, HOSTILE_ID), warnings=(CONTROLS,))
    page, dom = rendered(cluster(hostile, registry=HOSTILE_ID), tmp_path)

    source = page.read_text()
    assert "\x07" not in source and "\x00" not in source and "\u202e" not in source
    assert dom.find_all("script") == [] and len(dom.find_all("style")) == 1
    assert dom.find_all("b") == []
    assert not [a for e in dom.iter() for a in e.attrs if a.startswith("on")]
    (csp,) = [m for m in dom.find_all("meta") if "http-equiv" in m.attrs]
    assert csp.attrs["content"] == CONTENT_SECURITY_POLICY
    (section,) = sections(dom).values()
    assert section.find("h2", "node-id").text() == HOSTILE_ID
    rows = [[c.text() for c in r.find_all("td")] for r in section.find_all("tr")[-2:]]
    assert rows[0][1] == HOSTILE_ID and rows[0][5] == "A" * MAX_TEXT + "\u2026"
    shown = "bell\\u0007 escape\\u001b[31m rtl\\u202etxt.exe nul\\u0000"
    assert rows[1][1] == shown and rows[1][5] == "</table><b>bold</b>"
    assert shown in section.text()  # the warning
    assert HOSTILE_ID in dom.find("table", "fields").text()  # the registry
    assert len(source) < 20_000  # 10 KB strings do not make it in


def test_at_most_50_failing_entries_are_listed_then_how_many_more(tmp_path: Path) -> None:
    entries = [
        EntryResult(i, make_entry(i), f"req-{i}", (Problem(Check.BLOCK, f"bad {i}", i),))
        for i in range(MAX_FAILING + 70)
    ]
    _, dom = rendered(cluster(synthetic(entries)), tmp_path)

    (section,) = sections(dom).values()
    rows = section.find("table", "failing").find_all("tr")[1:]
    assert [r.find("td").text() for r in rows] == [str(i) for i in range(MAX_FAILING)]
    assert section.find("p", "more").text() == (
        "and 70 more failing entries (report.csv lists them all)"
    )
    assert "failing entries (120)" in section.text()


def test_a_time_that_is_no_date_is_shown_as_a_number(tmp_path: Path) -> None:
    entry = make_entry(0, time=2**64 - 1)
    _, dom = rendered(cluster(synthetic([EntryResult(0, entry, "req-0")])), tmp_path)
    assert f"unix time {2**64 - 1} (not a date)" in dom.find("svg", "decisions").text()


def near(pixel: tuple[int, ...], rgb: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 8 for a, b in zip(pixel, rgb, strict=False))


def test_a_screenshot_shows_the_page_with_its_colours(node: Node, tmp_path: Path) -> None:
    page, _ = rendered(three_nodes(node), tmp_path)
    png = tmp_path / "report.png"
    screenshot(page, png, width=800, height=500)

    width, height, pixels = png_pixels(png)
    assert (width, height) == (800, 500)
    assert len(set(pixels)) > 20, "the screenshot is (nearly) blank"
    # the verdict badges: red for the failed node, green for the passed one
    assert sum(near(p, (0xCF, 0x22, 0x2E)) for p in pixels) > 100
    assert sum(near(p, (0x1A, 0x7F, 0x37)) for p in pixels) > 100
