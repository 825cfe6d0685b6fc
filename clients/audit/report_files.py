"""The files an audit leaves: ``report.json``, ``report.csv`` and ``report.html``, written
in one place, owner-only (the report says who read whose records)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

from clients.audit.audit_report import write_report_csv, write_report_json
from clients.audit.auditor import ClusterReport
from clients.audit.report_html import report_html
from clients.sdk.output_files import private_dir, private_file

REPORT_FILES: Final = ("report.json", "report.csv", "report.html")


def write_reports(
    report: ClusterReport, out_dir: Path, *, audited_at: int, chain_id: int
) -> tuple[Path, ...]:
    """The three reports in ``out_dir`` (created owner-only), in :data:`REPORT_FILES`
    order; ``audited_at`` (unix seconds) and ``chain_id`` head the HTML report."""
    # JSON and CSV are written a row at a time: a large audit's report is never held whole.
    writers: tuple[Callable[[TextIO], object], ...] = (
        lambda out: write_report_json(report, out),
        lambda out: write_report_csv(report, out),
        lambda out: out.write(report_html(report, audited_at=audited_at, chain_id=chain_id)),
    )
    paths = tuple(private_dir(out_dir) / name for name in REPORT_FILES)
    for path, write in zip(paths, writers, strict=True):
        with private_file(path).open("w", encoding="utf-8", newline="") as out:
            write(out)
    return paths
