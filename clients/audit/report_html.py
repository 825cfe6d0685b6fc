"""``report.html``: the audit report as a person reads it in a browser. Per node the verdict,
entries, anchors and first failure; decisions over time and refusals by reason as charts;
the failing entries.

Rules this module follows:

- The page is one inert file: no script, nothing fetched; a Content-Security-Policy forbids
  both should anything slip through. Styles are inline CSS, charts inline SVG.
- Every string that comes from a node or the chain (node ids, request ids, messages that
  quote them, reason codes, the registry address) goes through :func:`_text`: cut at
  :data:`MAX_TEXT` characters, control and format characters written as ``\\uXXXX`` (so a
  bidi override cannot reorder what is shown), then HTML-escaped. Attributes hold only
  numbers and this module's own words.
- The page is bounded whatever the log's size: at most :data:`MAX_SPANS` time spans,
  :data:`MAX_REASONS` refusal reasons and :data:`MAX_FAILING` failing entries per node.
- A verdict is shown as the model's word, whatever it is; the words this module knows get
  their colour, any other gets a neutral one.
"""

from __future__ import annotations

import html
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from clients.audit.audit_report import entry_row
from clients.audit.auditor import ClusterReport
from core.audit import GRANTED
from core.audit_findings import NodeReport
from core.formats import iso_utc

#: characters of one string from a node or the chain shown, at most
MAX_TEXT: Final = 300
#: bars of the decisions-over-time chart, at most
MAX_SPANS: Final = 24
#: bars of the refusals-by-reason chart, at most; the rest are one "other reasons" bar
MAX_REASONS: Final = 12
#: failing entries listed per node; report.csv has them all
MAX_FAILING: Final = 50
#: warnings and log-wide problems listed per node
MAX_NOTES: Final = 20

CONTENT_SECURITY_POLICY: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

#: Unicode categories shown as escapes: controls, format characters (bidi overrides,
#: zero-width), lone surrogates, line and paragraph separators
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: CSS class of the verdicts this module knows
_VERDICT_CLASSES: Final = {"passed": "pass", "failed": "fail", "could not read": "unread"}

_STYLE: Final = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1f2328; background: #fff;
       margin: 24px; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 0 0 8px; overflow-wrap: anywhere; }
h3 { font-size: 14px; margin: 16px 0 4px; }
table { border-collapse: collapse; margin: 4px 0 12px; }
th, td { text-align: left; padding: 3px 10px 3px 0; vertical-align: top;
         white-space: nowrap; }
td.text { white-space: normal; overflow-wrap: anywhere; min-width: 8em; }
th { color: #59636e; font-weight: 600; }
table.entries td, table.entries th { border-bottom: 1px solid #d1d9e0; padding: 3px 8px; }
section.node { border: 1px solid #d1d9e0; border-radius: 6px; padding: 16px; margin: 16px 0; }
.verdict { display: inline-block; padding: 1px 10px; border-radius: 10px; color: #fff;
           font-weight: 600; }
.verdict.pass { background: #1a7f37; }
.verdict.fail { background: #cf222e; }
.verdict.unread, .verdict.other { background: #9a6700; }
.muted { color: #59636e; }
svg { display: block; margin: 4px 0 8px; }
svg text { font: 11px system-ui, sans-serif; fill: #59636e; }
rect.granted { fill: #1a7f37; }
rect.refused, rect.refusal { fill: #bc4c00; }
.key { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
.key.granted { background: #1a7f37; }
.key.refused { background: #bc4c00; }
"""


def report_html(report: ClusterReport, *, audited_at: int, chain_id: int) -> str:
    """The whole report as one self-contained HTML document."""
    overall = str(report.verdict)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        f"<title>medkms audit {overall}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>medkms audit {_verdict(overall)}</h1>",
        _fields(
            [
                ("audited at", _text(iso_utc(audited_at))),
                ("chain id", _text(chain_id)),
                ("registry", _text(report.registry_address)),
                ("latest block at start", _text(report.block)),
                ("entries", f"{report.entries} in {report.seconds:.2f} s"),
            ]
        ),
        _overview(report.nodes),
    ]
    parts += [_node_section(node) for node in report.nodes]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _text(value: object) -> str:
    """A string from outside, safe to put between tags (see the module doc)."""
    s = str(value)
    cut = len(s) > MAX_TEXT
    shown = "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) in _ESCAPED_CATEGORIES
        else c
        for c in s[:MAX_TEXT]
    )
    return html.escape(shown) + ("\u2026" if cut else "")


def _verdict(verdict: str) -> str:
    css = _VERDICT_CLASSES.get(verdict, "other")
    return f'<span class="verdict {css}">{_text(verdict)}</span>'


def _fields(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table; the values are HTML already."""
    body = "".join(f'<tr><th>{name}</th><td class="text">{value}</td></tr>' for name, value in rows)
    return f'<table class="fields">{body}</table>'


def _anchored(node: NodeReport) -> str:
    if not node.anchors_checked:
        return '<span class="muted">no anchor verified</span>'
    return (
        f"{node.anchored_size} entries in block {node.anchored_block} "
        f"({node.anchors_checked} anchors checked)"
    )


def _first_failure(node: NodeReport) -> str:
    first = node.first_failure()
    if first is not None:
        return _text(node.describe(first))
    if node.could_not_read:
        return _text(f"could not read: {node.could_not_read[0]}")
    return '<span class="muted">none</span>'


def _overview(nodes: Sequence[NodeReport]) -> str:
    head = "<tr><th>node</th><th>verdict</th><th>entries</th><th>first failure</th></tr>"
    body = "".join(
        f'<tr><td class="text">{_text(n.node_id)}</td><td>{_verdict(n.verdict)}</td>'
        f'<td>{len(n.entries)}</td><td class="text">{_first_failure(n)}</td></tr>'
        for n in nodes
    )
    return f'<table class="entries overview">{head}{body}</table>'


def _node_section(node: NodeReport) -> str:
    entries = f"{len(node.entries)} ({node.granted} granted, {node.denied} refused)"
    if node.start:
        entries += f", from entry {node.start}: those before were verified earlier"
    parts = [
        '<section class="node">',
        f'<h2 class="node-id">{_text(node.node_id)}</h2>',
        _fields(
            [
                ("verdict", _verdict(node.verdict)),
                ("entries", entries),
                ("anchored", _anchored(node)),
                ("first failure", _first_failure(node)),
            ]
        ),
        _notes(
            "problems of the whole log", [p.message for p in node.problems if p.leaf_index is None]
        ),
        _notes(
            "could not read (a read failed in transit: no evidence of tampering)",
            node.could_not_read,
        ),
        _notes("warnings", node.warnings),
        "<h3>decisions over time</h3>",
        _decisions_chart(node),
        "<h3>refusals by reason</h3>",
        _refusals_chart(node),
        _failing_entries(node),
        "</section>",
    ]
    return "\n".join(p for p in parts if p)


def _notes(title: str, notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_text(n)}</li>" for n in notes[:MAX_NOTES])
    return f"<h3>{title}</h3><ul>{items}</ul>" + _more(len(notes) - MAX_NOTES, "")


def _more(count: int, what: str) -> str:
    return f'<p class="more">and {count} more{what}</p>' if count > 0 else ""


@dataclass(frozen=True)
class Span:
    """One bar of the decisions-over-time chart: decisions at times ``[start, end]``."""

    start: int
    end: int
    granted: int
    refused: int


def time_spans(node: NodeReport) -> list[Span]:
    """The node's decisions in at most :data:`MAX_SPANS` equal spans of time, from the
    first entry's time to the last's (entries that did not parse are not decisions)."""
    decisions = [
        (r.entry.time, r.entry.decision == GRANTED) for r in node.entries if r.entry is not None
    ]
    if not decisions:
        return []
    first = min(t for t, _ in decisions)
    last = max(t for t, _ in decisions)
    width = -(-(last - first + 1) // MAX_SPANS)  # ceil: MAX_SPANS spans cover every second
    count = (last - first) // width + 1
    granted, refused = [0] * count, [0] * count
    for t, ok in decisions:
        (granted if ok else refused)[(t - first) // width] += 1
    return [
        Span(first + i * width, first + (i + 1) * width - 1, granted[i], refused[i])
        for i in range(count)
    ]


#: the charts' width, the decisions chart's plot area, the refusals chart's rows (pixels)
_CHART_W: Final = 720
_PLOT_X: Final = 40
_PLOT_TOP: Final = 12
_PLOT_H: Final = 130
_LABEL_W: Final = 240
_ROW_H: Final = 22


def _svg(css: str, label: str, height: float, shapes: Iterable[str]) -> str:
    return (
        f'<svg class="{css}" role="img" aria-label="{label}" width="{_CHART_W}" '
        f'height="{height}" viewBox="0 0 {_CHART_W} {height}">{"".join(shapes)}</svg>'
    )


def _nothing(what: str) -> str:
    return f'<p class="muted">{what}</p>'


def _decisions_chart(node: NodeReport) -> str:
    spans = time_spans(node)
    if not spans:
        return _nothing("no decisions")
    peak = max(s.granted + s.refused for s in spans)
    slot = (_CHART_W - _PLOT_X) / len(spans)
    bar = max(slot * 0.8, 1.0)
    base = _PLOT_TOP + _PLOT_H
    shapes = []
    for i, span in enumerate(spans):
        x = _PLOT_X + i * slot + (slot - bar) / 2
        when = f"{_text(iso_utc(span.start))} to {_text(iso_utc(span.end))}"
        tip = f"{when}: {span.granted} granted, {span.refused} refused"
        y = float(base)
        for css, n in (("granted", span.granted), ("refused", span.refused)):
            if not n:
                continue
            h = _PLOT_H * n / peak
            y -= h
            shapes.append(
                f'<rect class="{css}" data-count="{n}" x="{x:.1f}" y="{y:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{tip}</title></rect>'
            )
    height = base + 34
    labels = [
        f'<text x="{_PLOT_X - 6}" y="{_PLOT_TOP + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{_PLOT_X - 6}" y="{base}" text-anchor="end">0</text>',
        f'<line x1="{_PLOT_X}" y1="{base}" x2="{_CHART_W}" y2="{base}" stroke="#d1d9e0"/>',
        f'<text x="{_PLOT_X}" y="{base + 16}">{_text(iso_utc(spans[0].start))}</text>',
        f'<text x="{_CHART_W}" y="{base + 16}" text-anchor="end">'
        f"{_text(iso_utc(spans[-1].end))}</text>",
        f'<text x="{_PLOT_X}" y="{base + 30}">{len(spans)} spans of '
        f"{spans[0].end - spans[0].start + 1} s</text>",
    ]
    legend = (
        '<p class="legend"><span class="key granted"></span>granted'
        '<span class="key refused"></span>refused</p>'
    )
    return _svg("decisions", "decisions over time", height, shapes + labels) + legend


def refusal_reasons(node: NodeReport) -> list[tuple[str, int]]:
    """Refusals per reason code, most first; beyond :data:`MAX_REASONS` - 1 reasons the
    rest are summed as one ``N other reasons`` row."""
    counts = Counter(
        r.entry.reason_code
        for r in node.entries
        if r.entry is not None and r.entry.decision != GRANTED
    ).most_common()
    if len(counts) <= MAX_REASONS:
        return counts
    kept, rest = counts[: MAX_REASONS - 1], counts[MAX_REASONS - 1 :]
    return [*kept, (f"{len(rest)} other reasons", sum(n for _, n in rest))]


def _refusals_chart(node: NodeReport) -> str:
    reasons = refusal_reasons(node)
    if not reasons:
        return _nothing("no refusals")
    peak = max(n for _, n in reasons)
    room = _CHART_W - _LABEL_W - 60
    rows = []
    for i, (reason, n) in enumerate(reasons):
        y = i * _ROW_H
        w = max(room * n / peak, 1.0)
        rows.append(
            f'<text x="{_LABEL_W - 8}" y="{y + 15}" text-anchor="end">{_text(reason)}</text>'
            f'<rect class="refusal" data-count="{n}" x="{_LABEL_W}" y="{y + 4}" '
            f'width="{w:.1f}" height="{_ROW_H - 8}"><title>{_text(reason)}: {n}</title></rect>'
            f'<text x="{_LABEL_W + w + 6:.1f}" y="{y + 15}">{n}</text>'
        )
    return _svg("refusals", "refusals by reason", len(reasons) * _ROW_H, rows)


#: the failing-entries table: heading, the report row's key (clients/audit/audit_report.py),
#: and the cell's CSS class ("text": free text, which may wrap anywhere)
_FAILING_COLUMNS: Final = (
    ("entry", "leaf_index", ""),
    ("request", "request_id", "text"),
    ("time", "time", ""),
    ("decision", "decision", ""),
    ("reason", "reason", ""),
    ("problem", "problem", "text"),
)


def _failing_entries(node: NodeReport) -> str:
    failing = [r for r in node.entries if not r.ok]
    if not failing:
        return ""
    head = "".join(f"<th>{name}</th>" for name, _, _ in _FAILING_COLUMNS)
    body = []
    for result in failing[:MAX_FAILING]:
        row = entry_row(node, result)
        cells = "".join(
            f'<td class="{css}">{_text(row[key])}</td>' for _, key, css in _FAILING_COLUMNS
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f"<h3>failing entries ({len(failing)})</h3>"
        f'<table class="entries failing"><tr>{head}</tr>{"".join(body)}</table>'
        + _more(len(failing) - MAX_FAILING, " failing entries (report.csv lists them all)")
    )
