"""The cluster across separate network hosts (issue 12, item 4): each party in its own
network namespace with its own directory, set up with the runbook's commands (README,
"Running across hosts"): the chain, the registry admin (who also keeps the CA here),
five nodes, the coordinator, and an app host for the patient and the doctor. Only
public files travel between the directories: identity files, CSRs, certificates, the
CA's certificate and the connection profile.

On it: the patient-to-doctor flow; a partition of n - m nodes under load (two readers on
the app host, `kmsctl provider probe`) with every read served;
one node cut off from the chain reports NOT_SERVING while the others serve, and serves
again, without a restart, once the route is back.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.phases import Read, phase, table
from deploy.anvil import find_anvil
from deploy.netns import Host, HostNetwork
from deploy.sample_records import lab_result
from kms_node.settings import DEFAULT_SOFTHSM_MODULE

pytestmark = pytest.mark.multihost

PY = sys.executable
NODES = 5
THRESHOLD = 3
CHAIN_PORT, NODE_PORT, COORDINATOR_PORT, METRICS_PORT = 8545, 7000, 7100, 9100
FUNDS_WEI = 10**21


@dataclass
class World:
    lan: HostNetwork
    root: Path
    env: dict[str, str]
    hosts: dict[str, Host]
    rpc_url: str
    deployed: dict[str, Any]


def run(host: Host, env: dict[str, str], *argv: str, cwd: Path | None = None) -> str:
    done = (
        host.run([*argv], env=env, timeout_s=180)
        if cwd is None
        else host.run(["sh", "-c", f'cd "{cwd}" && exec "$@"', "sh", *argv], env=env, timeout_s=180)
    )
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout


def kmsctl(world: World, host: str, *args: str) -> str:
    return run(world.hosts[host], world.env, PY, "-m", "cli.kmsctl", *args)


def python(world: World, host: str, code: str) -> str:
    return run(world.hosts[host], world.env, PY, "-c", code)


def wait_for(world: World, host: str, code: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        done = world.hosts[host].run([PY, "-c", code], env=world.env, timeout_s=30)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{what}: {done.stderr[-500:]}"
        time.sleep(0.5)


def fund(world: World, address: str) -> None:
    python(
        world,
        "admin",
        f"from deploy.anvil import set_balance; set_balance({world.rpc_url!r}, {address!r}, "
        f"{FUNDS_WEI!r})",
    )


def toml(path: Path, values: dict[str, Any], nodes: list[dict[str, str]] | None = None) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for node in nodes or []:
        lines += ["[[nodes]]", *(f"{k} = {json.dumps(v)}" for k, v in node.items())]
    path.write_text("\n".join(lines) + "\n")


def secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hosts")
    env = {**os.environ, "MEDKMS_PW": secrets.token_hex(16)}
    with HostNetwork.create("mh") as lan:
        hosts = {
            name: lan.add_host(name)
            for name in ["chain", "admin", *(f"node-{i}" for i in range(1, NODES + 1)),
                         "coordinator", "app"]
        }  # fmt: skip
        for name in hosts:
            (root / name).mkdir(mode=0o700)
        rpc_url = f"http://{hosts['chain'].address}:{CHAIN_PORT}"
        hosts["chain"].spawn(
            [find_anvil(), "--host", hosts["chain"].address, "--port", str(CHAIN_PORT), "--silent"],
            root / "chain" / "anvil.log",
        )
        world = World(lan, root, env, hosts, rpc_url, {})
        wait_for(
            world,
            "admin",
            f"from deploy.anvil import rpc_call; rpc_call({rpc_url!r}, 'eth_chainId', [])",
            30,
            "the chain did not answer the admin's host",
        )
        _set_up(world)
        yield world


def _set_up(world: World) -> None:
    admin = world.root / "admin"
    pw = ["--password-env", "MEDKMS_PW"]
    made = json.loads(
        kmsctl(world, "admin", "account", "new", "--keystore", str(admin / "admin.json"), *pw)
    )
    fund(world, made["address"])
    world.deployed = json.loads(
        kmsctl(
            world, "admin", "admin", "deploy", "--keystore", str(admin / "admin.json"), *pw,
            "--rpc-url", world.rpc_url, "--profile-out", str(admin / "admin.toml"),
        )
    )  # fmt: skip
    kmsctl(world, "admin", "ca", "init", "--dir", str(admin / "ca"))
    ca_cert = (admin / "ca" / "ca.crt").read_text()
    as_admin = [
        "--keystore",
        str(admin / "admin.json"),
        *pw,
        "--profile",
        str(admin / "admin.toml"),
    ]
    for i in range(1, NODES + 1):
        node_id = f"node-{i}"
        host, home = world.hosts[node_id], world.root / node_id
        (home / "ca.crt").write_text(ca_cert)
        data = home / "data"
        data.mkdir(mode=0o700)
        config = data / "node.toml"
        toml(
            config,
            {
                "node_id": node_id,
                "listen": f"{host.address}:{NODE_PORT}",
                "metrics_listen": f"{host.address}:{METRICS_PORT}",
                "chain_rpc_url": world.rpc_url,
                "registry_address": world.deployed["registry_address"],
                "registry_start_block": world.deployed["registry_start_block"],
                "data_dir": ".",
                "hsm_module": DEFAULT_SOFTHSM_MODULE,
                "hsm_token_label": f"medkms-{node_id}",
                "hsm_pin_file": str(secret(home / "pins" / "user.pin", secrets.token_hex(16))),
                "hsm_so_pin_file": str(secret(home / "pins" / "so.pin", secrets.token_hex(16))),
                "softhsm_conf": "softhsm2.conf",
                "softhsm_token_dir": "tokens",
                "tls_ca_cert": str(home / "ca.crt"),
                "tls_cert": str(home / "tls" / "node.crt"),
                "tls_key": str(home / "tls" / "node.key"),
                "anchor_every_entries": 50,
                "anchor_interval_s": 2.0,
            },
        )
        identity = home / "identity.json"
        run(host, world.env, PY, "-m", "cli.node", "init", "--config", str(config),
            "--identity-out", str(identity))  # fmt: skip
        request = json.loads(
            run(
                host,
                world.env,
                PY,
                "-m",
                "cli.node",
                "tls-request",
                "--config",
                str(config),
                "--hosts",
                host.address,
            )  # fmt: skip
        )
        signed = admin / f"{node_id}.crt"
        kmsctl(world, "admin", "ca", "sign", "--dir", str(admin / "ca"), "--csr", request["csr"],
               "--role", "node", "--name", node_id, "--out", str(signed))  # fmt: skip
        run(host, world.env, PY, "-m", "cli.node", "tls-install", "--config", str(config),
            "--cert", str(signed))  # fmt: skip
        registered = kmsctl(world, "admin", "admin", "register-node", *as_admin,
                            "--identity", str(identity),
                            "--endpoint", f"{host.address}:{NODE_PORT}")  # fmt: skip
        account = json.loads(identity.read_text())["account"]
        assert account in registered
        fund(world, account)
        host.spawn([PY, "-m", "cli.node", "serve", "--config", str(config)], home / "node.log")
    _start_coordinator(world)


def _start_coordinator(world: World) -> None:
    admin, home = world.root / "admin", world.root / "coordinator"
    host = world.hosts["coordinator"]
    (home / "ca.crt").write_text((admin / "ca" / "ca.crt").read_text())
    config = home / "coordinator.toml"
    toml(
        config,
        {
            "listen": f"{host.address}:{COORDINATOR_PORT}",
            "metrics_listen": f"{host.address}:{METRICS_PORT}",
            "threshold": THRESHOLD,
            "chain_rpc_url": world.rpc_url,
            "registry_address": world.deployed["registry_address"],
            "tls_ca_cert": str(home / "ca.crt"),
            "tls_cert": str(home / "tls" / "server.crt"),
            "tls_key": str(home / "tls" / "server.key"),
            "tls_client_cert": str(home / "tls" / "client.crt"),
            "tls_client_key": str(home / "tls" / "client.key"),
        },
        [
            {"node_id": n, "address": f"{world.hosts[n].address}:{NODE_PORT}"}
            for n in world.hosts
            if n.startswith("node-")
        ],
    )
    made = json.loads(
        run(
            host,
            world.env,
            PY,
            "-m",
            "cli.coordinator",
            "tls-request",
            "--config",
            str(config),
            "--hosts",
            host.address,
        )  # fmt: skip
    )
    signed = {}
    for which, role in [("server", "coordinator-server"), ("client", "coordinator-client")]:
        signed[which] = admin / f"coordinator-{which}.crt"
        kmsctl(world, "admin", "ca", "sign", "--dir", str(admin / "ca"), "--csr",
               made[which]["csr"], "--role", role, "--name", "coordinator",
               "--out", str(signed[which]))  # fmt: skip
    run(host, world.env, PY, "-m", "cli.coordinator", "tls-install", "--config", str(config),
        "--server-cert", str(signed["server"]), "--client-cert", str(signed["client"]))  # fmt: skip
    host.spawn(
        [PY, "-m", "cli.coordinator", "serve", "--config", str(config)], home / "coordinator.log"
    )


def _as(who: str, world: World) -> list[str]:
    app = world.root / "app"
    return [
        "--keystore", str(app / f"{who}.json"), "--password-env", "MEDKMS_PW",
        "--profile", str(app / "profile.toml"), "--blob-dir", str(app / "blobs"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def record_id(world: World) -> str:
    """On the app host: the patient's and doctor's keystores and profile, the patient
    registered, a lab result stored and granted to the doctor."""
    app = world.root / "app"
    admin = world.root / "admin"
    pw = ["--password-env", "MEDKMS_PW"]
    coordinator = f"{world.hosts['coordinator'].address}:{COORDINATOR_PORT}"
    (app / "ca.crt").write_text((admin / "ca" / "ca.crt").read_text())
    profile = app / "profile.toml"
    profile.write_text(
        (admin / "admin.toml").read_text()
        + f'coordinator_address = "{coordinator}"\n'
        + f'tls_ca_cert = "{app / "ca.crt"}"\n'
        + f"threshold = {THRESHOLD}\n"
    )
    wait_for(
        world,
        "app",
        "from pathlib import Path; from deploy.processes import grpc_serving; "
        "from proto.transport import Transport; "
        f"assert grpc_serving({coordinator!r}, Transport.tls(Path({str(app / 'ca.crt')!r})))",
        60,
        "the coordinator never served the app's host",
    )
    people = {}
    for who in ("patient", "doctor"):
        keystore = str(app / f"{who}.json")
        made = json.loads(
            kmsctl(
                world,
                "app",
                "account",
                "new",
                "--keystore",
                keystore,
                "--profile",
                str(profile),
                *pw,
            )  # fmt: skip
        )
        people[who] = made
        fund(world, made["address"])
    kmsctl(world, "admin", "admin", "grant-provider", people["doctor"]["did"],
           "--keystore", str(admin / "admin.json"), *pw,
           "--profile", str(admin / "admin.toml"))  # fmt: skip
    as_patient = _as("patient", world)
    kmsctl(world, "app", "patient", "register", *as_patient)
    record = app / "record.json"
    record.write_bytes(lab_result())
    stored = json.loads(
        kmsctl(world, "app", "patient", "store", str(record), "--type", "lab_result", *as_patient)
    )
    kmsctl(world, "app", "account", "public", "--keystore", str(app / "doctor.json"), *pw,
           "--profile", str(profile), "--out", str(app / "doctor.pub.json"))  # fmt: skip
    kmsctl(
        world,
        "app",
        "patient",
        "grant",
        str(app / "doctor.pub.json"),
        "--types",
        "lab_result",
        *as_patient,
    )
    return str(stored["record_id"])


def test_a_patient_and_a_doctor_on_their_own_host_share_a_record(
    world: World, record_id: str
) -> None:
    app = world.root / "app"
    as_doctor = _as("doctor", world)
    out = app / "read.json"
    kmsctl(world, "app", "provider", "read", record_id, "--out", str(out), *as_doctor)
    assert out.read_bytes() == lab_result()


#: the partition's phases, in seconds: reads before the links go down, while they are
#: down, and after they are back
BEFORE_S, DURING_S, AFTER_S = 4.0, 8.0, 4.0
#: the probe's reads per second: a steady load inside the doctor's budget at the
#: coordinator (the default ``requester_rate_per_s``), so that a refusal for the rate
#: is never what fails a read, however fast this machine serves
PROBE_RATE = 40


def test_a_partition_of_n_minus_m_nodes_under_load_fails_no_read(
    world: World, record_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two readers on the app host (`kmsctl provider probe`, 40 reads/s) while the links of n - m
    nodes go down and come back: no read fails in any phase. The figures are printed
    (and kept in the test's directory as partition.json)."""
    app, cut = world.root / "app", ("node-4", "node-5")
    reads_file = app / "probe.jsonl"
    probe = world.hosts["app"].spawn(
        [PY, "-m", "cli.kmsctl", "provider", "probe", record_id, "--readers", "2",
         "--rate", str(PROBE_RATE),
         "--seconds", str(BEFORE_S + DURING_S + AFTER_S + 2), "--out", str(reads_file),
         *_as("doctor", world)],
        app / "probe.log",
        env=world.env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (reads_file.exists() and reads_file.read_text()):
        assert probe.poll() is None, (app / "probe.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the probe read nothing"
        time.sleep(0.2)
    # Phases by the wall clock, which every namespace shares.
    t0 = time.time()
    time.sleep(BEFORE_S)
    t1 = time.time()
    for name in cut:
        world.lan.cut(world.hosts[name])
    try:
        time.sleep(DURING_S)
    finally:
        for name in cut:
            world.lan.mend(world.hosts[name])
    t2 = time.time()
    time.sleep(AFTER_S)
    t3 = time.time()
    assert probe.wait(60) == 0, (app / "probe.log").read_text()[-2000:]
    reads = [
        Read(line["started"], line["seconds"], line["error"])
        for line in map(json.loads, reads_file.read_text().splitlines())
    ]
    figures = {
        "before": phase(reads, t0, t1),
        "during": phase(reads, t1, t2),
        "after": phase(reads, t2, t3),
    }
    (world.root / "partition.json").write_text(json.dumps(figures, indent=2))
    with capsys.disabled():
        print(f"\npartition of {', '.join(cut)} under load, from the app host:")
        print(table([("partition", figures)], "fault"))
    for name, figure in figures.items():
        assert figure["sent"] > 0, f"no read was sent {name} the partition"
        assert figure["failed"] == 0, f"reads failed {name} the partition: {figure['errors']}"


def _log_events(path: Path, name: str) -> int:
    return sum(
        1
        for line in path.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == name
    )


def test_a_node_cut_off_from_the_chain_stands_aside_and_comes_back(
    world: World, record_id: str
) -> None:
    app, node = world.root / "app", world.hosts["node-1"]
    log = world.root / "node-1" / "node.log"
    process = node.processes[0]
    not_serving, serving = _log_events(log, "node_not_serving"), _log_events(log, "node_serving")
    world.lan.bar(node, world.hosts["chain"])
    try:
        deadline = time.monotonic() + 30
        while _log_events(log, "node_not_serving") == not_serving:
            assert time.monotonic() < deadline, "node-1 kept saying it could serve"
            time.sleep(0.5)
        # The others serve: a read goes through with node-1 standing aside.
        out = app / "read.json"
        out.unlink(missing_ok=True)
        kmsctl(
            world, "app", "provider", "read", record_id, "--out", str(out), *_as("doctor", world)
        )
        assert out.read_bytes() == lab_result()
    finally:
        world.lan.unbar(node, world.hosts["chain"])
    deadline = time.monotonic() + 30
    while _log_events(log, "node_serving") == serving:
        assert time.monotonic() < deadline, "node-1 did not serve again once it reached the chain"
        time.sleep(0.5)
    assert process.poll() is None  # no restart
