"""The results as files: latest.json, latest.md, latency.png, and the results
section of benchmarks/README.md.

``python -m benchmarks.report [--out DIR]`` rebuilds the markdown, the plot and
the README section from an existing latest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

#: issue 5's targets: key -> (comparison, value, unit shown)
TARGETS: dict[str, tuple[str, float]] = {
    "node_single_ratio": (">=", 0.60),
    "node_batch32_ratio": (">=", 0.85),
    "cluster_3of5_ratio": (">=", 0.50),
    "cluster_p50_ms": ("<=", 10.0),
    "revocation_s": ("<=", 2.0),
    "node_rss_mb": ("<", 150.0),
}
#: issue 14's targets (CPU per request over the bare operation's, and the index at scale)
TARGETS_14: dict[str, tuple[str, float]] = {
    "node_single_cost_x": ("<=", 2.5),
    "node_batch32_cost_x": ("<=", 1.0),
    "cluster_3of5_ratio": (">=", 0.35),
    "cluster_p50_over_bound": ("<=", 2.0),
    "revocation_s": ("<=", 0.5),
    "index_kb_per_patient": ("<=", 0.5),
    "restart_s_100k_patients": ("<=", 10.0),
}
HEADLINE = [
    ("node_single_ratio", "one node, single requests: re-encryptions per node CPU-second / bare"),
    ("node_batch32_ratio", "one node, batches of 32: the same"),
    ("cluster_3of5_ratio", "cluster 3-of-5, read_record: throughput / crypto-only bound"),
    ("cluster_p50_ms", "cluster 3-of-5, read_record p50 at concurrency 1 (ms)"),
    (
        "cluster_3of5_ratio_c8",
        "cluster 3-of-5, read_record at concurrency 8: throughput / crypto-only bound",
    ),
    ("revocation_s", "revoke mined -> first refusal via the coordinator, worst trial (s)"),
    ("node_rss_mb", "peak RSS of a node process, max over nodes (MB)"),
    ("cluster_dek_3of5_ratio", "cluster 3-of-5, DEK path only: throughput / crypto-only bound"),
    ("cluster_dek_p50_ms", "cluster 3-of-5, DEK path only, p50 at concurrency 1 (ms)"),
    (
        "cluster_3of5_ratio_effective_cores",
        "the same, with the cores the machine delivered to parallel bare crypto",
    ),
    ("node_single_ratio_with_chain", "one node, single: with anvil's CPU counted as the node's"),
    ("node_single_wall_ratio", "one node, single: throughput / bare rate of one core (wall)"),
    (
        "node_single_ratio_wire",
        "one node, single: over bare re-encryption from capsule bytes to cfrag bytes",
    ),
    ("node_batch32_ratio_wire", "one node, batches of 32: the same"),
    (
        "node_single_cost_x",
        "one node, single: node CPU per request / bare re-encryption from bytes (1 / ratio_wire)",
    ),
    ("node_batch32_cost_x", "one node, batches of 32: the same per capsule"),
    (
        "cluster_p50_over_bound",
        "cluster 3-of-5, read p50 at concurrency 1 / the bare 3-of-5 request's CPU time",
    ),
    (
        "cluster_cpu_cost_x",
        "cluster 3-of-5, read_record at concurrency 4: CPU per read of all processes / the bound's",
    ),
    ("cluster_cpu_cost_x_c1", "the same at concurrency 1"),
    (
        "cluster_fragments_per_read",
        "cluster 3-of-5, read_record at concurrency 4: fragments the nodes judged per read",
    ),
    (
        "cluster_hedges_per_read",
        "the same: extra nodes the coordinator asked per read after its hedge delay",
    ),
    (
        "audit_overhead_ms",
        "audit log per single request: durable append + HSM-signed receipt, p50 (ms)",
    ),
    (
        "audit_overhead_batch32_ms_per_capsule",
        "audit log per capsule in a batch of 32 (one transaction), p50 (ms)",
    ),
    ("index_kb_per_patient", "grant index memory per patient (benchmarks/index_scale.py, KB)"),
    (
        "restart_s_100k_patients",
        "node restart to serving with 100,000 patients, from the index snapshot (s)",
    ),
    (
        "grpc_floor_server_cpu_ms",
        "server CPU of an empty mTLS gRPC call, asyncio server, at the node phases' "
        "concurrency (ms)",
    ),
]


def audit_cpu_per_entry(audit: dict[str, Any], entries_per_commit: float) -> float:
    """An audit entry's CPU in commits of ``entries_per_commit`` entries, on the line
    through the two commit sizes measured on their own: 1 and a batch's."""
    k1, cost1 = 1, audit["single"]["cpu_ms_per_entry"]
    kb = audit["batch"]["entries_per_append"]
    cost_b = audit["batch"]["cpu_ms_per_entry"] * kb  # per commit
    per_entry = (cost_b - cost1) / (kb - k1)
    fixed = cost1 - per_entry
    return float((fixed + per_entry * entries_per_commit) / entries_per_commit)


def _node_budget(results: dict[str, Any]) -> list[str]:
    """Where one node's CPU per single request goes, from parts measured in this run."""
    c = results.get("plan", {}).get("concurrency", 4)
    single = results.get("phases", {}).get(f"node_single_c{c}")
    floor = results.get("grpc_floor", {}).get(f"c{c}")
    audit = results.get("audit")
    wire = results.get("baseline", {}).get("ops", {}).get("reencrypt_from_bytes")
    if not (single and floor and audit and wire):
        return []
    node_id = next((k for k in single["cpu_s"] if k.startswith("node-")), None)
    if node_id is None:
        return []
    total = single["cpu_s"][node_id] / max(single["count"], 1) * 1000.0
    grouped = single.get("entries_per_commit") or 1.0
    parts = [
        ("re-encryption from capsule bytes to cfrag bytes (bare library)", wire["cpu_ms_per_op"]),
        (
            f"durable audit append with its HSM-signed receipt, {grouped:.2f} entries per "
            "commit as measured",
            audit_cpu_per_entry(audit, grouped),
        ),
        ("gRPC with mutual TLS, an empty call", floor["server_cpu_ms_per_call"]),
    ]
    rest = total - sum(ms for _, ms in parts)
    parts.append(
        (
            "the rest: signature check, grant index, replay memory, kfrag unwrap in the HSM, "
            "logs, metrics, messages",
            rest,
        )
    )
    rows = [[what, _fmt(ms), f"{ms / total:.0%}"] for what, ms in parts]
    rows.append(["node CPU per request, measured", _fmt(total), "100%"])
    return [
        f"### Where a node's time goes (single requests, c{c})",
        "",
        "Each part is measured on its own in this run; the rest is the difference.",
        "",
        *_table(["part", "CPU ms", "share"], rows),
        "",
    ]


def _read_layers(phases: dict[str, Any]) -> list[str]:
    """Where a cluster read's time goes, layer by layer, from the phases that have
    ``layers_ms`` (the harness's ``_layers_ms``): what each layer adds to the one below."""
    rows = []
    for name, phase in phases.items():
        layers = phase.get("layers_ms")
        if not layers or None in layers.values():
            continue
        app, coordinator = layers["app_ms"], layers["coordinator_ms"]
        call, handler = layers["node_call_ms"], layers["node_handler_ms"]
        rows.append(
            [
                name,
                _fmt(app),
                _fmt(app - coordinator),
                _fmt(coordinator - call),
                _fmt(call - handler),
                _fmt(handler),
            ]
        )
    if not rows:
        return []
    return [
        "",
        "### Where a read's time goes (cluster 3-of-5, mean ms per read)",
        "",
        "From the coordinator's and the nodes' own histograms over the phase: the app's "
        "side is the read end to end less the coordinator's handler (signing, the call to "
        "the coordinator both ways, decryption, the blob); the coordinator's, its handler "
        "less the mean node call (it waits for the slowest fragment it needs, so this holds "
        "that wait too); a node call's transport, the call as the coordinator waits on it "
        "less the node's handler (gRPC and TLS at both ends, and the wait for a core).",
        "",
        *_table(
            [
                "phase",
                "end to end",
                "app's side",
                "coordinator",
                "node call transport",
                "node handler",
            ],
            rows,
        ),
    ]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _target(key: str, value: Any, targets: dict[str, tuple[str, float]] = TARGETS) -> str:
    if key not in targets:
        return ""
    op, goal = targets[key]
    if value is None:
        return f"{op} {goal:g}: not measured"
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    return f"{op} {goal:g}: {'met' if met else 'not met'}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    base = results["baseline"]
    c = results["plan"]["concurrency"]
    lines = [
        f"Run: `{results['mode']}` mode, {m['date']}, commit {m.get('commit') or 'unknown'}, "
        f"took {_fmt(results.get('duration_s'))} s.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {_fmt(m['memory_gib'])} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, umbral-pre {m['umbral_pre']}, "
        f"grpcio {m['grpcio']}, web3 {m['web3']}.",
        "",
        "### Headline",
        "",
    ]
    lines += _table(
        ["key", "value", "what", "issue 5 target", "issue 14 target"],
        [
            [
                f"`{key}`",
                _fmt(results.get(key)),
                what,
                _target(key, results.get(key)),
                _target(key, results.get(key), TARGETS_14),
            ]
            for key, what in HEADLINE
        ],
    )
    cores = m["cores"]
    lines += [
        "",
        f"Bound: one 3-of-5 request's crypto takes {_fmt(base['bound_ms'])} ms of one core "
        f"(3 reencrypt + 3 cfrag verify + 1 decrypt_reencrypted), so {cores} cores could serve "
        f"at most {_fmt(cores / base['bound_ms'] * 1000.0)} requests/s. Bare re-encryption: "
        f"{_fmt(base['reencrypt_rate_per_core'])} per CPU-second; from capsule bytes to cfrag "
        f"bytes (what a node must do with a capsule off the wire): "
        f"{_fmt(base.get('wire_reencrypt_rate_per_core'))}. "
        f"{cores} bare processes at once reached {_fmt(base.get('parallel_reencrypt_rate'))}/s "
        f"together: the machine delivered {_fmt(base.get('effective_cores'), 2)} cores' worth.",
        "",
        "### Baseline: bare umbral-pre, one process, one core",
        "",
    ]
    ops = {**base["ops"], "3-of-5 request (bound)": base["bound_request"]}
    lines += _table(
        ["operation", "CPU ms/op", "ops per CPU-s", "p50 ms", "p99 ms"],
        [
            [
                name,
                _fmt(op["cpu_ms_per_op"]),
                _fmt(op["rate_per_cpu_s"]),
                _fmt(op["p50_ms"]),
                _fmt(op["p99_ms"]),
            ]
            for name, op in ops.items()
        ],
    )
    bounds = ", ".join(f"{k}-of-5: {_fmt(v)} ms" for k, v in base.get("bounds_ms", {}).items())
    lines += ["", f"Bounds by threshold: {bounds}.", ""]
    audit = results.get("audit")
    if audit:
        single, batch = audit["single"], audit["batch"]
        lines += [
            "### Audit log overhead (SoftHSM token, one node process)",
            "",
            f"Appending one decision (one fsync'd SQLite transaction, Merkle nodes, a receipt "
            f"signed in the HSM) takes {_fmt(single['p50_ms'])} ms at p50 "
            f"({_fmt(single['cpu_ms_per_entry'])} ms CPU); a batch of 32 in one transaction "
            f"takes {_fmt(batch['p50_ms'])} ms, {_fmt(batch['wall_ms_per_entry'])} ms per "
            f"capsule. The receipt signature alone is {_fmt(audit['receipt_sign_p50_ms'])} ms.",
            "",
        ]
    lines += _node_budget(results)
    lines += [
        "### Phases (closed loop)",
        "",
        f"`c1` is one request at a time (latency), `c{c}` keeps {c} in flight (throughput). "
        "CPU is per request (per batch for batches), from /proc before and after the phase; "
        "`chain` is anvil, `client` this harness process. Node phases meter node-1 and anvil only.",
        "",
    ]
    rows = []
    for name, p in results.get("phases", {}).items():
        cpu = p["cpu_ms_per_request"]
        rows.append(
            [
                name,
                str(p["count"]),
                str(p["errors"]),
                _fmt(p["throughput_rps"]),
                _fmt(p["p50_ms"]),
                _fmt(p["p95_ms"]),
                _fmt(p["p99_ms"]),
                _fmt(cpu["nodes"]),
                _fmt(cpu["coordinator"]),
                _fmt(cpu["chain"]),
                _fmt(cpu["client"]),
                _fmt(cpu["total"]),
                _fmt(p.get("node_handler_ms_mean")),
            ]
        )
    lines += _table(
        [
            "phase",
            "requests",
            "errors",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "CPU ms: nodes",
            "coord.",
            "chain",
            "client",
            "total",
            "node handler ms",
        ],
        rows,
    )
    lines += _read_layers(results.get("phases", {}))
    if len(results.get("repeats", [])) > 1:
        lines += [
            "",
            "Repeats (headline values are their medians; each repeat's ratios are taken "
            "against the mean of the bare figures measured just before and just after it):",
            "",
        ]
        keys = [
            "node_single_cost_x",
            "node_batch32_cost_x",
            "cluster_3of5_ratio",
            "cluster_p50_ms",
            "bare_wire_reencrypt_rate_per_core",
            "bare_bound_ms",
            "bare_bound_before_ms",
            "bare_bound_after_ms",
        ]
        lines += _table(
            ["repeat", *keys],
            [
                [str(i + 1), *(_fmt(r.get(k)) for k in keys)]
                for i, r in enumerate(results["repeats"])
            ],
        )
    lines += ["", "### Peak RSS (VmHWM, the largest of each service's processes)", ""]
    counts = results.get("process_counts", {})
    lines += _table(
        ["service", "MB", "processes"],
        [[k, _fmt(v), str(counts.get(k, 1))] for k, v in results.get("peak_rss_mb", {}).items()],
    )
    lines += ["", "### Scaling (read_record end to end; each point its own fresh cluster)", ""]
    lines += _table(
        [
            "nodes",
            "threshold",
            "processes/node",
            "read p50 ms",
            "DEK p50 ms",
            f"read req/s (c{c})",
            "CPU ms/request",
            "bound ms",
            "ratio",
            f"node-1 alone req/s (c{c})",
        ],
        [
            [
                str(s["nodes"]),
                str(s["threshold"]),
                str(s.get("processes_per_node", 1)),
                _fmt(s["read_p50_ms"]),
                _fmt(s["dek_p50_ms"]),
                _fmt(s["read_throughput_rps"]),
                _fmt(s["read_cpu_ms_per_request"]["total"]),
                _fmt(s["bound_ms"]),
                _fmt(s["ratio"]),
                _fmt(s.get("node_single_throughput_rps")),
            ]
            for s in results.get("scaling", [])
        ],
    )
    rev = results.get("revocation", {})
    lines += ["", f"### Revocation (polled every {_fmt(rev.get('poll_s'))} s)", ""]
    lines += _table(
        ["trial", "mined -> refused s", "revoke tx s", "polls", "served after revoke", "refusal"],
        [
            [
                str(i + 1),
                _fmt(t["revocation_s"]),
                _fmt(t["revoke_tx_s"]),
                str(t["polls"]),
                str(t["served_after_revoke"]),
                t["refusal"].replace("|", "/")[:90],
            ]
            for i, t in enumerate(rev.get("trials", []))
        ],
    )
    if results.get("notes"):
        lines += ["", "### Notes", ""]
        lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def compact_json(results: dict[str, Any]) -> str:
    """Indented JSON with lists of numbers kept on one line (the CDFs)."""
    text = json.dumps(_finite(results), indent=2, allow_nan=False)
    return re.sub(
        r"\[\s*([-0-9.eE+,\s]+?)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )


def update_readme(section: str, readme: Path = README) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def render(results: dict[str, Any], out: Path, *, readme: bool) -> None:
    """latest.md, latency.png and (optionally) the README section from ``results``."""
    from benchmarks import plot  # matplotlib is only needed here

    section = markdown(results)
    (out / "latest.md").write_text("## Latest results\n\n" + section)
    plot.latency_plot(results, out / "latency.png")
    if readme:
        update_readme(section)


#: keys of latest.json that other benchmarks add (``index_scale --latest``): a harness run
#: does not measure them, so it keeps them from the file it replaces
ADDED_BY_OTHER_BENCHMARKS = ("index_kb_per_patient", "restart_s_100k_patients", "index_scale")


def write(results: dict[str, Any], out: Path, *, readme: bool) -> None:
    latest = out / "latest.json"
    if latest.exists():
        earlier = json.loads(latest.read_text())
        for key in ADDED_BY_OTHER_BENCHMARKS:
            if key in earlier and key not in results:
                results[key] = earlier[key]
    latest.write_text(compact_json(results) + "\n")
    render(results, out, readme=readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder with latest.json")
    args = parser.parse_args(argv)
    results = json.loads((args.out / "latest.json").read_text())
    render(results, args.out, readme=args.out.resolve() == RESULTS_DIR)
    print(f"rendered {args.out / 'latest.md'} and {args.out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
