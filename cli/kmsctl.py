"""`kmsctl`: run a local cluster and drive the patient, provider and demo flows.

    kmsctl cluster up [--nodes N] [--threshold M] [--state-dir DIR] [--detach] [--reset]
                      [--dev-plaintext]
    kmsctl cluster status|down [--state-dir DIR]
    kmsctl demo [--state-dir DIR]
    kmsctl patient register|store|grant|revoke|deactivate ... [--as NAME]
    kmsctl provider read RECORD_ID... [--as NAME] [--out FILE|DIR] [--receipts-out FILE]
    kmsctl provider probe RECORD_ID --seconds S [--readers N] [--rate R] --out FILE
    kmsctl patient|provider|emergency ... --keystore FILE --profile FILE --blob-dir DIR
    kmsctl account new|show|public --keystore FILE
    kmsctl admin deploy|grant-provider|grant-emergency|revoke-emergency|register-node|
                 deactivate-node|activate-node|fund --keystore FILE ...
    kmsctl audit verify [--node NODE_ID] [--report-dir DIR] [--receipts FILE] [--state-file FILE]
                        [--state-from-events] [--quiet]
    kmsctl audit export --format fhir [--node NODE_ID] [--out FILE]

A party acts either from its own files (an encrypted keystore and a connection profile:
``cli/parties.py``) or, on the local cluster, as a demo account of the state directory
(``accounts/NAME.json``, chosen with ``--as NAME``).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from cli import account, admin, ca_commands, parties
from cli.audit_progress import AuditProgress
from clients.audit.audit_report import failures, summary_lines
from clients.audit.auditor import ChannelFactory, audit_cluster, channel_factory
from clients.audit.fhir_export import fhir_bundle
from clients.audit.receipts_file import load_receipts, save_receipts
from clients.audit.report_files import write_reports
from clients.audit.state_file import load_state, save_state
from clients.sdk.output_files import private_dir, private_file
from clients.sdk.patient import PatientClient
from clients.sdk.provider import ProviderClient, RecordRead
from clients.sdk.records import MAX_DOCUMENT_BYTES
from core import logs
from core.audit_findings import Verdict
from core.audit_sources import failed_in_transit
from core.errors import ChainRejected, IntegrityError, InvalidRequest, KmsError
from core.local_files import read_regular_file
from core.record_types import RecordType
from core.requests import MAX_BATCH
from deploy.local_cluster import LocalCluster
from deploy.processes import grpc_serving


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster.open(args.state_dir)


def _record_id(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise InvalidRequest("record id must be 32 bytes of hex") from None
    if len(raw) != 32:
        raise InvalidRequest("record id must be 32 bytes of hex")
    return raw


def cmd_cluster_up(args: argparse.Namespace) -> None:
    cluster = LocalCluster.up(
        args.state_dir,
        nodes=args.nodes,
        threshold=args.threshold,
        processes=args.processes,
        reset=args.reset,
        dev_plaintext=args.dev_plaintext,
    )
    print(f"cluster up: {args.nodes} nodes, threshold {args.threshold}")
    print(f"  chain        {cluster.rpc_url}  registry {cluster.registry_address}")
    print(
        f"  coordinator  {cluster.coordinator_address}  metrics {cluster.coordinator_metrics_url}"
    )
    for node in cluster.nodes:
        print(f"  {node.node_id:<12} {node.address}  metrics {node.metrics_url}")
    print(f"  state        {cluster.state_dir / 'cluster.json'}")
    tls = cluster.data.get("tls")
    print(f"  tls          CA {tls['ca_cert']}" if tls else "  tls          OFF (development mode)")
    if args.detach:
        return
    print("press Ctrl-C to stop")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):  # timed: a signal taken by another thread wakes no untimed wait
            pass
    except KeyboardInterrupt:
        pass
    cluster.down()
    print("cluster down")


def cmd_cluster_down(args: argparse.Namespace) -> None:
    stopped = _cluster(args).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def cmd_cluster_status(args: argparse.Namespace) -> None:
    cluster = _cluster(args)
    running = cluster.running()
    print(
        json.dumps(
            {"running": running, "serving": _serving(cluster, running), **cluster.data}, indent=2
        )
    )


def _serving(cluster: LocalCluster, running: list[str]) -> list[str]:
    """The running services that answer health checks over the cluster's TLS."""
    serving = []
    if "coordinator" in running and grpc_serving(cluster.coordinator_address, cluster.transport):
        serving.append("coordinator")
    for node in cluster.nodes:
        if node.node_id in running and grpc_serving(
            node.address, cluster.transport, server_name=node.node_id
        ):
            serving.append(node.node_id)
    return serving


def cmd_demo(args: argparse.Namespace) -> None:
    from cli import demo

    demo.run(_cluster(args))


def cmd_patient(args: argparse.Namespace) -> None:
    me = parties.party(args)
    with PatientClient(
        me.identity,
        registry=me.registry,
        blobs=me.blobs,
        coordinator_address=me.coordinator_address,
        transport=me.transport,
    ) as client:
        _patient_action(args, me, client)


def _patient_action(args: argparse.Namespace, me: parties.Party, client: PatientClient) -> None:
    if args.action == "register":
        client.register()
        print(f"registered {me.did(me.identity.address)}")
    elif args.action == "store":
        document = read_regular_file(args.file, max_bytes=MAX_DOCUMENT_BYTES, what="record file")
        stored = client.store_record(document, RecordType.parse(args.type))
        print(
            json.dumps(
                {
                    "record_id": "0x" + stored.record_id.hex(),
                    "record_type": stored.record_type.label,
                    "storage_uri": stored.storage_uri,
                    "content_hash": stored.content_hash.hex(),
                },
                indent=2,
            )
        )
    elif args.action == "grant":
        address, umbral_key = me.keys_of(args.grantee)
        outcome = client.grant(
            address,
            umbral_key,
            [RecordType.parse(t) for t in args.types.split(",")],
            duration_s=args.duration,
            threshold=me.grant_threshold(args.threshold),
        )
        print(
            json.dumps(
                {
                    "grantee": me.did(outcome.grantee),
                    "expires_at": outcome.expires_at,
                    "enrolled": sorted(outcome.enrolled),
                    "failed": outcome.failed,
                },
                indent=2,
            )
        )
    elif args.action == "emergency-opt-in":
        address, umbral_key = me.keys_of(args.responder)
        outcome = client.opt_in_emergency(
            address,
            umbral_key,
            [RecordType.parse(t) for t in args.types.split(",")],
            threshold=me.grant_threshold(args.threshold),
        )
        print(
            json.dumps(
                {
                    "responder": me.did(outcome.grantee),
                    "record_types": sorted(t.label for t in outcome.allowed_types),
                    "enrolled": sorted(outcome.enrolled),
                    "failed": outcome.failed,
                },
                indent=2,
            )
        )
    elif args.action == "emergency-opt-out":
        block = client.opt_out_emergency(me.address_of(args.responder))
        waited = client.await_nodes(block)
        print(
            f"opted out in block {block}; in force at every node (as the coordinator reports) "
            f"after {waited * 1000:.0f} ms"
        )
    elif args.action == "revoke":
        block = client.revoke(me.address_of(args.grantee))
        waited = client.await_nodes(block)
        print(
            f"revoked in block {block}; in force at every node (as the coordinator reports) "
            f"after {waited * 1000:.0f} ms"
        )
    elif args.action == "allow-writer":
        writer = me.address_of(args.writer)
        block = client.allow_writer(writer, allowed=not args.stop)
        verb = "may no longer" if args.stop else "may now"
        print(
            f"{me.did(writer)} {verb} anchor records for {me.did(me.identity.address)} "
            f"(block {block})"
        )
    elif args.action == "erase":
        block = client.erase(_record_id(args.record_id))
        waited = client.await_nodes(block)
        print(
            "erased: blob deleted, record inactive at every node (as the coordinator reports) "
            f"after {waited * 1000:.0f} ms"
        )
    elif args.action == "deactivate":
        block = client.deactivate(_record_id(args.record_id))
        waited = client.await_nodes(block)
        print(
            f"deactivated in block {block}; in force at every node (as the coordinator "
            f"reports) after {waited * 1000:.0f} ms"
        )


def _provider(me: parties.Party) -> ProviderClient:
    """The SDK as the party's app, reaching the coordinator over TLS."""
    return ProviderClient(
        me.identity,
        registry=me.registry,
        blobs=me.blobs,
        coordinator_address=me.coordinator_address,
        transport=me.transport,
    )


def cmd_provider_read(args: argparse.Namespace) -> int:
    """One record, or several of one patient in one batch read; with ``--receipts-out``
    the receipts of the nodes that served them are added to the receipts file."""
    record_ids = [_record_id(r) for r in args.record_ids]
    with _provider(parties.party(args)) as provider:
        if len(record_ids) == 1:
            reads: dict[bytes, RecordRead | KmsError] = {
                record_ids[0]: provider.read_record_with_receipts(record_ids[0], args.purpose)
            }
        else:
            reads = provider.read_records_with_receipts(record_ids, args.purpose)
    read = [r for r in reads.values() if isinstance(r, RecordRead)]
    if args.receipts_out and read:
        receipts = [receipt for r in read for receipt in r.receipts]
        save_receipts(args.receipts_out, receipts)
        print(f"receipts: {args.receipts_out} ({len(receipts)} receipts)", file=sys.stderr)
    if args.out and len(record_ids) > 1:
        private_dir(args.out)
    failed = 0
    for record_id, outcome in reads.items():
        if isinstance(outcome, KmsError):
            failed += 1
            about = f" (request {outcome.request_id})" if outcome.request_id else ""
            print(f"kmsctl: 0x{record_id.hex()}: {outcome.message}{about}", file=sys.stderr)
        elif args.out:
            out = args.out if len(record_ids) == 1 else args.out / f"0x{record_id.hex()}.json"
            private_file(out).write_bytes(outcome.plaintext)  # health data: the owner's alone
        else:
            sys.stdout.write(outcome.plaintext.decode() + "\n")
    return 1 if failed else 0


#: a probe is a bounded check of a deployment, not a load generator left running
MAX_PROBE_SECONDS, MAX_PROBE_READERS, MAX_PROBE_RATE = 3600, 64, 1000.0
#: reads per second a probe starts by default, over all its readers: well inside a
#: requester's budget at the coordinator (``requester_rate_per_s``), so that a check of
#: a deployment is not refused as a flood
DEFAULT_PROBE_RATE = 20.0


class _Pacer:
    """Start times ``1 / rate`` apart, shared by the probe's readers. A reader that
    falls behind (a slow read) starts its next read at once, and the schedule does not
    try to catch up with a burst: ``rate`` is the most the probe sends."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + self._interval
        time.sleep(max(0.0, start - time.monotonic()))


def cmd_provider_probe(args: argparse.Namespace) -> None:
    """Read one record over and over from ``--readers`` threads for ``--seconds``: a
    deployment's check from an app's host, starting at most ``--rate`` reads a second.
    Each read's start (Unix time), latency and outcome is a JSON line of ``--out``,
    written as it ends; a summary goes to stdout; it fails (exit status 1) if any read
    failed."""
    if not 0 < args.seconds <= MAX_PROBE_SECONDS:
        raise InvalidRequest(f"--seconds must be in (0, {MAX_PROBE_SECONDS}]")
    if not 0 < args.readers <= MAX_PROBE_READERS:
        raise InvalidRequest(f"--readers must be in [1, {MAX_PROBE_READERS}]")
    if not 0 < args.rate <= MAX_PROBE_RATE:
        raise InvalidRequest(f"--rate must be in (0, {MAX_PROBE_RATE:g}] reads per second")
    me, record_id = parties.party(args), _record_id(args.record_id)
    pacer = _Pacer(args.rate)
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def reader(out: TextIO) -> None:
        with _provider(me) as provider:
            while True:
                pacer.wait_turn()
                if time.monotonic() >= deadline:
                    break
                started, t0 = time.time(), time.perf_counter()
                error = None
                try:
                    provider.read_record(record_id, args.purpose)
                except KmsError as e:
                    error = f"{e.grpc_status}: {e.message[:200]}"
                seconds = time.perf_counter() - t0
                line = json.dumps({"started": started, "seconds": seconds, "error": error})
                with lock:
                    out.write(line + "\n")
                    out.flush()
                    (latencies.append(seconds) if error is None else errors.append(error))

    with open(args.out, "w") as out:
        threads = [threading.Thread(target=reader, args=(out,)) for _ in range(args.readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    summary: dict[str, float] = {"sent": len(latencies) + len(errors), "failed": len(errors)}
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        summary |= {"p50_ms": round(cuts[49] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1)}
    print(json.dumps(summary))
    if errors:
        common = "; ".join(f"{n} x {e}" for e, n in Counter(errors).most_common(3))
        raise KmsError(f"{len(errors)} of {summary['sent']} reads failed: {common}")


def cmd_emergency_open(args: argparse.Namespace) -> None:
    me = parties.party(args)
    patient = me.address_of(args.patient)
    with _provider(me) as responder:
        block, expires_at = responder.open_emergency_access(patient, args.duration)
    print(
        f"emergency access to {me.did(patient)} opened in block {block}, "
        f"until {expires_at} (read with --purpose ETREAT)"
    )


def _node_channels(cluster: LocalCluster) -> ChannelFactory:
    """How the auditor reaches nodes: the operator's mutual-TLS identity."""
    return channel_factory(cluster.transport)


#: `kmsctl audit verify`'s exit status when no check failed but some node could not be read
EXIT_COULD_NOT_READ = 3


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every node passed, 1 (IntegrityError) on any failed check, 3 when none
    failed but some node could not be read."""
    cluster = _cluster(args)
    registry = cluster.registry()
    receipts = load_receipts(args.receipts) if args.receipts else []
    try:
        since = load_state(args.state_file, registry.list_nodes()) if args.state_file else {}
        report = audit_cluster(
            registry,
            _node_channels(cluster),
            node_ids=args.node,
            receipts=receipts,
            since=since,
            events=registry if args.state_from_events else None,
            start_block=int(cluster.data["chain"]["registry_start_block"]),
            progress=None if args.quiet else AuditProgress(sys.stderr),
        )
    except KmsError as e:
        if not failed_in_transit(e):
            raise
        # The chain could not be read before any node was: nothing was checked.
        print(f"kmsctl: audit incomplete: could not read the chain: {e.message}", file=sys.stderr)
        return EXIT_COULD_NOT_READ
    paths = write_reports(
        report,
        args.report_dir or args.state_dir / "audit",
        audited_at=int(time.time()),
        # as recorded when the registry was deployed: no chain call that could fail after
        # the audit and lose its report
        chain_id=int(cluster.data["chain"]["chain_id"]),
    )
    print("\n".join(summary_lines(report)))
    print(f"report: {', '.join(str(p) for p in paths)}")
    if args.state_file:
        save_state(args.state_file, report, since)
        print(f"state: {args.state_file} (the next run with it starts where this one ended)")
    if report.verdict is Verdict.FAILED:
        raise IntegrityError(f"audit failed: {failures(report)}")
    if report.verdict is Verdict.COULD_NOT_READ:
        # Not evidence of tampering: nothing failed, but the audit is incomplete.
        print(f"kmsctl: audit incomplete: {failures(report)}", file=sys.stderr)
        return EXIT_COULD_NOT_READ
    return 0


def cmd_audit_export(args: argparse.Namespace) -> None:
    cluster = _cluster(args)
    registry = cluster.registry()
    # Integrity only: an entry the policy check would flag is still an event to export.
    report = audit_cluster(
        registry, _node_channels(cluster), node_ids=args.node, rejudge_decisions=False
    )
    sound = [n for n in report.nodes if n.ok]
    bundle = fhir_bundle(sound, registry.chain_id(), now=int(time.time()))
    if args.out:
        private_file(args.out).write_text(bundle)
    else:
        sys.stdout.write(bundle)
    exported = sum(len(n.entries) for n in sound)
    print(f"exported {exported} AuditEvents of {len(sound)} nodes", file=sys.stderr)
    if not report.ok:
        raise IntegrityError(f"not exported, their logs do not verify: {failures(report)}")


_PARTY_HELP = "a demo identity's name (--state-dir), or a DID or 0x address (--profile)"
_GRANTEE_HELP = (
    "a demo identity's name (--state-dir), or the public identity file the party sent, "
    "from `kmsctl account public` (--profile)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsctl", description=__doc__.splitlines()[0])
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        type=Path,
        default=parties.DEFAULT_STATE_DIR,
        help="the local cluster's state directory (default: .state)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="the local cluster").add_subparsers(
        dest="action", required=True
    )
    up = cluster.add_parser("up", parents=[state], help="start anvil, nodes and coordinator")
    up.add_argument("--nodes", type=int, default=5)
    up.add_argument("--threshold", type=int, default=3)
    up.add_argument("--processes", type=int, default=1, help="server processes per node")
    up.add_argument("--detach", action="store_true", help="return once everything serves")
    up.add_argument("--reset", action="store_true", help="wipe a stopped cluster's state first")
    up.add_argument(
        "--dev-plaintext",
        action="store_true",
        help="development only: no TLS anywhere (default: a fresh CA, mutual TLS to nodes)",
    )
    up.set_defaults(func=cmd_cluster_up)
    cluster.add_parser("down", parents=[state], help="stop it").set_defaults(func=cmd_cluster_down)
    cluster.add_parser(
        "status", parents=[state], help="show cluster.json, what runs and what serves"
    ).set_defaults(func=cmd_cluster_status)

    sub.add_parser("demo", parents=[state], help="run the patient -> doctor scenario").set_defaults(
        func=cmd_demo
    )

    patient = sub.add_parser("patient", help="patient flows").add_subparsers(
        dest="action", required=True
    )
    who = argparse.ArgumentParser(add_help=False)
    parties.add_party_options(who, default_name="patient")
    patient.add_parser("register", parents=[who])
    store = patient.add_parser("store", parents=[who], help="store a FHIR JSON record")
    store.add_argument("file", type=Path)
    store.add_argument("--type", required=True, help=", ".join(t.label for t in RecordType))
    grant = patient.add_parser("grant", parents=[who])
    grant.add_argument("grantee", help=_GRANTEE_HELP)
    grant.add_argument("--types", required=True, help="comma-separated record types")
    grant.add_argument("--duration", type=int, default=3600, help="seconds (default 3600)")
    grant.add_argument(
        "--threshold", type=int, default=0, help="default: the cluster's or the profile's"
    )
    opt_in = patient.add_parser(
        "emergency-opt-in",
        parents=[who],
        help="let an emergency-role holder open short emergency grants",
    )
    opt_in.add_argument("responder", help=_GRANTEE_HELP)
    opt_in.add_argument("--types", required=True, help="comma-separated record types")
    opt_in.add_argument(
        "--threshold", type=int, default=0, help="default: the cluster's or the profile's"
    )
    opt_out = patient.add_parser("emergency-opt-out", parents=[who])
    opt_out.add_argument("responder", help=_PARTY_HELP)
    revoke = patient.add_parser("revoke", parents=[who])
    revoke.add_argument("grantee", help=_PARTY_HELP)
    writer = patient.add_parser(
        "allow-writer", parents=[who], help="let a provider anchor records for the patient"
    )
    writer.add_argument("writer", help=_PARTY_HELP)
    writer.add_argument("--stop", action="store_true", help="withdraw the permission")
    deactivate = patient.add_parser("deactivate", parents=[who])
    deactivate.add_argument("record_id")
    erase = patient.add_parser("erase", parents=[who], help="deactivate and delete the blob")
    erase.add_argument("record_id")
    for action in patient.choices.values():
        action.set_defaults(func=cmd_patient)

    provider = sub.add_parser("provider", help="provider flows").add_subparsers(
        dest="action", required=True
    )
    read = provider.add_parser(
        "read", help="read a shared record, or several of one patient in one batch"
    )
    parties.add_party_options(read, default_name="doctor")
    read.add_argument("record_ids", nargs="+", metavar="record_id", help=f"1 to {MAX_BATCH}")
    read.add_argument("--purpose", default="TREAT", help="HL7 purpose of use (default TREAT)")
    read.add_argument(
        "--out",
        type=Path,
        help="write the record here instead of stdout; with several records, a directory "
        "to write each to as 0x<record id>.json",
    )
    read.add_argument(
        "--receipts-out",
        type=Path,
        help="add the nodes' signed audit receipts for the records read to FILE (a JSON "
        "list that `kmsctl audit verify --receipts FILE` checks against the nodes' logs)",
    )
    read.set_defaults(func=cmd_provider_read)
    probe = provider.add_parser(
        "probe", help="read a record repeatedly for a while; each read's latency and outcome"
    )
    parties.add_party_options(probe, default_name="doctor")
    probe.add_argument("record_id")
    probe.add_argument("--purpose", default="TREAT", help="HL7 purpose of use (default TREAT)")
    probe.add_argument("--seconds", type=float, required=True, help="how long to read")
    probe.add_argument("--readers", type=int, default=2, help="concurrent readers (default 2)")
    probe.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_PROBE_RATE,
        help=f"most reads started per second, over all readers (default {DEFAULT_PROBE_RATE:g})",
    )
    probe.add_argument("--out", type=Path, required=True, help="each read as a JSON line")
    probe.set_defaults(func=cmd_provider_probe)

    emergency = sub.add_parser("emergency", help="emergency access").add_subparsers(
        dest="action", required=True
    )
    open_ = emergency.add_parser("open", help="open a time-boxed emergency grant (emergency role)")
    parties.add_party_options(open_, default_name="responder")
    open_.add_argument("patient", help=_PARTY_HELP)
    open_.add_argument(
        "--duration", type=int, default=3600, help="seconds, at most 14400 (default 3600)"
    )
    open_.set_defaults(func=cmd_emergency_open)

    account.add_commands(sub)
    admin.add_commands(sub)

    audit = sub.add_parser("audit", help="audit the nodes' logs").add_subparsers(
        dest="action", required=True
    )
    nodes = argparse.ArgumentParser(add_help=False, parents=[state])
    nodes.add_argument(
        "--node", action="append", default=[], help="only this node (repeatable; default: all)"
    )
    verify = audit.add_parser(
        "verify",
        parents=[nodes],
        help="check every signature, entry, anchor and grant; exit 1 naming what failed, "
        "3 when nothing failed but some node could not be read",
    )
    verify.add_argument(
        "--report-dir",
        type=Path,
        help="where report.json, report.csv and report.html go (default: STATE/audit)",
    )
    verify.add_argument("--receipts", type=Path, help="a JSON list of receipts to check too")
    verify.add_argument(
        "--state-file",
        metavar="FILE",
        type=Path,
        help="incremental: start each node where the audit that wrote FILE ended, then "
        "write what this one verified back to FILE",
    )
    verify.add_argument(
        "--state-from-events",
        action="store_true",
        help="judge decisions by the registry state rebuilt from its events, for a chain node "
        "that keeps no historical state (default: the registry's views at each block)",
    )
    verify.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (each node's entries read, and the rate, once a second)",
    )
    verify.set_defaults(func=cmd_audit_verify)
    export = audit.add_parser(
        "export", parents=[nodes], help="the entries of verified logs as FHIR AuditEvents"
    )
    export.add_argument("--format", choices=["fhir"], default="fhir", help="FHIR R4B Bundle")
    export.add_argument("--out", type=Path, help="write here instead of stdout")
    export.set_defaults(func=cmd_audit_export)
    ca_commands.add_commands(sub)
    return parser


#: the registry's refusals a person can act on, by the contract's error name: who runs
#: which command next (README "Running across hosts")
_NEXT_STEPS: dict[str, str] = {
    "PatientNotRegistered": "the patient registers first: kmsctl patient register",
    "PatientAlreadyRegistered": "nothing to do: this account is registered already",
    "GranteeNotProvider": "the registry admin makes the grantee a provider: "
    "kmsctl admin grant-provider DID",
    "WriterNotProvider": "the registry admin makes the writer a provider: "
    "kmsctl admin grant-provider DID",
    "NotRecordWriter": "the patient lets this provider anchor her records: "
    "kmsctl patient allow-writer DID",
    "ResponderNotEmergencyRole": "the registry admin gives the responder the role: "
    "kmsctl admin grant-emergency DID",
    "NotOptedIn": "the patient opts in for this responder: "
    "kmsctl patient emergency-opt-in RESPONDER --types TYPES",
    "EmergencyWindowsExhausted": "the patient opts in again: "
    "kmsctl patient emergency-opt-in RESPONDER --types TYPES",
    "GrantNotActive": "there is no active grant to this grantee: kmsctl patient grant",
    "NodeNotRegistered": "the registry admin registers the node: "
    "kmsctl admin register-node --identity FILE --endpoint HOST:PORT",
    "NodeAlreadyRegistered": "a node id is registered once: choose another node_id, "
    "or kmsctl admin activate-node NODE_ID",
    "NodeAccountInUse": "each node needs its own account: run kms-node init for a new token",
    "AccessControlUnauthorizedAccount": "only the registry admin may do this: "
    "use the admin's keystore",
}


def _next_step(error: KmsError) -> str:
    """What to run next after ``error``, or "" when the message says all there is."""
    if isinstance(error, ChainRejected):
        return _NEXT_STEPS.get(error.reason, "")
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("kmsctl", "warning")
    try:
        status = args.func(args)
    except KmsError as e:
        # The request id names the decisions in the nodes' audit logs (kmsctl audit).
        about = f" (request {e.request_id})" if e.request_id else ""
        print(f"kmsctl: {e.message}{about}", file=sys.stderr)
        if step := _next_step(e):
            print(f"kmsctl: next: {step}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kmsctl: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
