"""Every party from its own files only: the admin, patients, providers and a responder
from their keystores and connection profiles, the nodes from their own configs, tokens
and PIN files. No state directory: the admin deploys the registry on a fresh anvil,
registers the nodes from the identity files real ``kms-node init`` wrote, and funds
them; the nodes and the coordinator are started as their operators would start them.
(The TLS certificates come from one CA here; who signs them is another matter.)"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest.mock import patch

import pytest

from cli.kmsctl import main
from contracts.registry import RegistryClient
from core.did import parse_did
from deploy import processes
from deploy.anvil import AnvilProcess, set_balance
from deploy.certs import ClusterCa
from deploy.sample_records import diagnosis, lab_result
from kms_node.settings import DEFAULT_SOFTHSM_MODULE
from proto.transport import Transport

pytestmark = pytest.mark.cluster
Completed = subprocess.CompletedProcess[str]

NODES, THRESHOLD = 3, 2
HOST = "127.0.0.1"
#: every party's password; no output of any command may carry it
PASSWORD = "only-its-party-knows-" + secrets.token_hex(8)


def run(module: str, *args: str, env: dict[str, str] | None = None) -> Completed:
    """``python -m MODULE ARGS`` in its own process, as a person runs it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def kmsctl(*args: str) -> Completed:
    """``kmsctl ARGS`` in this process (a process per command would spend most of the
    test importing web3); :func:`run` checks the refusals that must hold for a process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), patch.object(sys, "stdin", io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ok(result: Completed) -> str:
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    return result.stdout


def refused(result: Completed, message: str) -> None:
    """A clear refusal: exit code 1, a line naming the problem, no traceback, no secret."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("kmsctl: "), result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def write_toml(
    path: Path, values: dict[str, object], nodes: list[dict[str, str]] | None = None
) -> None:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, int | float) else json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in values.items()]
    for node in nodes or []:
        lines += ["", "[[nodes]]", *(f"{k} = {value(v)}" for k, v in node.items())]
    path.write_text("\n".join(lines) + "\n")


def secret_file(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


@dataclass(frozen=True)
class Party:
    """One party's own folder: its keystore and the file holding its password."""

    home: Path
    address: str
    did: str

    @property
    def keystore(self) -> Path:
        return self.home / "keystore.json"

    def key(self) -> list[str]:
        return ["--keystore", str(self.keystore), "--password-file", str(self.home / "password")]

    def own(self, profile: Path, blobs: Path) -> list[str]:
        """What a patient, provider or responder command takes: its own files only."""
        return [*self.key(), "--profile", str(profile), "--blob-dir", str(blobs)]


def new_party(home: Path, profile: Path | None = None) -> Party:
    """``kmsctl account new``, as the party would run it on its own machine."""
    home.mkdir(parents=True, mode=0o700)
    secret_file(home / "password", PASSWORD)
    chain = ["--profile", str(profile)] if profile else []
    created = json.loads(ok(kmsctl("account", "new", *Party(home, "", "").key(), *chain)))
    assert (home / "keystore.json").stat().st_mode & 0o777 == 0o600
    return Party(home, created["address"], created.get("did", ""))


@dataclass
class World:
    root: Path
    rpc_url: str
    chain_id: int
    admin: Party
    #: the admin's profile: chain and registry
    admin_profile: Path
    #: a patient's or provider's: the admin's plus the coordinator, its CA and the threshold
    profile: Path
    blobs: Path
    registry: RegistryClient
    node_ids: list[str]


def _node_operator(
    root: Path, node_id: str, rpc_url: str, deployed: dict[str, object], ca: ClusterCa
) -> tuple[Path, Path, str]:
    """A node operator's host: its own data directory, token, PIN files (apart) and
    config; ``kms-node init --identity-out``. Returns the config, the identity file and
    the address it will serve on."""
    home = root / "operators" / node_id
    data = home / "data"
    data.mkdir(parents=True, mode=0o700)
    user_pin = secret_file(home / "pins" / "user.pin", secrets.token_hex(16))
    so_pin = secret_file(home / "pins" / "so.pin", secrets.token_hex(16))
    server = ca.server_cert(node_id)
    address = f"{HOST}:{processes.free_port()}"
    config = data / "node.toml"
    write_toml(
        config,
        {
            "node_id": node_id,
            "listen": address,
            "metrics_listen": f"{HOST}:{processes.free_port()}",
            "chain_rpc_url": rpc_url,
            "registry_address": str(deployed["registry_address"]),
            "registry_start_block": int(str(deployed["registry_start_block"])),
            "data_dir": ".",
            "hsm_module": DEFAULT_SOFTHSM_MODULE,
            "hsm_token_label": f"medkms-{node_id}",
            "hsm_pin_file": str(user_pin),
            "hsm_so_pin_file": str(so_pin),
            "softhsm_conf": "softhsm2.conf",
            "softhsm_token_dir": "tokens",
            "tls_ca_cert": str(ca.ca_cert),
            "tls_cert": str(server.cert),
            "tls_key": str(server.key),
            "anchor_every_entries": 50,
            "anchor_interval_s": 2.0,
        },
    )
    identity = home / "identity.json"
    init = run("cli.node", "init", "--config", str(config), "--identity-out", str(identity))
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout) == json.loads(identity.read_text())
    return config, identity, address


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("own-material")
    children: list[subprocess.Popen[bytes]] = []
    with AnvilProcess(log_path=root / "logs" / "anvil.log") as anvil:
        try:
            admin = new_party(root / "admin")
            # The admin's account needs ether for gas; on anvil it is conjured (dev only).
            set_balance(anvil.rpc_url, admin.address, 1000 * 10**18)
            admin_profile = root / "admin" / "profile.toml"
            deployed = json.loads(
                ok(
                    kmsctl(
                        "admin",
                        "deploy",
                        "--rpc-url",
                        anvil.rpc_url,
                        "--profile-out",
                        str(admin_profile),
                        *admin.key(),
                    )
                )
            )
            chain_id = int(deployed["chain_id"])
            assert parse_did(deployed["admin"]).address == admin.address
            ca = ClusterCa.ensure(root / "ca")
            node_ids = [f"node-{i}" for i in range(1, NODES + 1)]
            with ThreadPoolExecutor(max_workers=NODES) as pool:
                operators = list(
                    pool.map(
                        lambda n: _node_operator(root, n, anvil.rpc_url, deployed, ca), node_ids
                    )
                )
            for node_id, (config, identity, address) in zip(node_ids, operators, strict=True):
                registered = ok(
                    kmsctl(
                        "admin",
                        "register-node",
                        "--identity",
                        str(identity),
                        "--endpoint",
                        address,
                        "--profile",
                        str(admin_profile),
                        *admin.key(),
                    )
                )
                account = json.loads(identity.read_text())["account"]
                assert f"did:pkh:eip155:{chain_id}:{account}" in registered
                funded = ok(
                    kmsctl(
                        "admin",
                        "fund",
                        account,
                        "--ether",
                        "0.5",
                        "--profile",
                        str(admin_profile),
                        *admin.key(),
                    )
                )
                assert "its balance is 0.5 ether" in funded
                log = root / "logs" / f"{node_id}.log"
                process = processes.spawn(
                    [sys.executable, "-m", "cli.node", "serve", "--config", str(config)], log
                )
                children.append(process)
                operator = ca.client_cert("operator")
                transport = Transport.tls(ca.ca_cert, operator.cert, operator.key)
                processes.wait_until(
                    node_id,
                    partial(processes.grpc_serving, address, transport, server_name=node_id),
                    process,
                    log,
                )
            coordinator_address = f"{HOST}:{processes.free_port()}"
            server, client = ca.server_cert("coordinator"), ca.client_cert("coordinator")
            coordinator_config = root / "coordinator" / "coordinator.toml"
            coordinator_config.parent.mkdir()
            write_toml(
                coordinator_config,
                {
                    "listen": coordinator_address,
                    "threshold": THRESHOLD,
                    "chain_rpc_url": anvil.rpc_url,
                    "registry_address": str(deployed["registry_address"]),
                    "node_timeout_s": 3.0,
                    "tls_ca_cert": str(ca.ca_cert),
                    "tls_cert": str(server.cert),
                    "tls_key": str(server.key),
                    "tls_client_cert": str(client.cert),
                    "tls_client_key": str(client.key),
                },
                [
                    {"node_id": n, "address": address}
                    for n, (_, _, address) in zip(node_ids, operators, strict=True)
                ],
            )
            log = root / "logs" / "coordinator.log"
            process = processes.spawn(
                [
                    sys.executable,
                    "-m",
                    "cli.coordinator",
                    "serve",
                    "--config",
                    str(coordinator_config),
                ],
                log,
            )
            children.append(process)
            processes.wait_until(
                "coordinator",
                lambda: processes.grpc_serving(coordinator_address, Transport.tls(ca.ca_cert)),
                process,
                log,
            )
            # What a patient or provider is given: the admin's profile, the coordinator's
            # address, the CA bundle that checks it, and the threshold.
            public = root / "public"
            public.mkdir()
            shutil.copy(ca.ca_cert, public / "ca.pem")
            profile = public / "profile.toml"
            profile.write_text(
                admin_profile.read_text()
                + f'coordinator_address = "{coordinator_address}"\n'
                + 'tls_ca_cert = "ca.pem"\n'
                + f"threshold = {THRESHOLD}\n"
            )
            yield World(
                root=root,
                rpc_url=anvil.rpc_url,
                chain_id=chain_id,
                admin=admin,
                admin_profile=admin_profile,
                profile=profile,
                blobs=root / "blobs",
                registry=RegistryClient(anvil.rpc_url, str(deployed["registry_address"])),
                node_ids=node_ids,
            )
        finally:
            for process in children:
                process.terminate()
            for process in children:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _admin(world: World, *args: str) -> str:
    return ok(kmsctl("admin", *args, "--profile", str(world.admin_profile), *world.admin.key()))


def test_a_full_flow_from_each_partys_own_files(world: World) -> None:
    patient = new_party(world.root / "patient", world.profile)
    doctor = new_party(world.root / "doctor", world.profile)
    assert doctor.did == f"did:pkh:eip155:{world.chain_id}:{doctor.address}"
    # The doctor sends the patient its public identity; the admin makes it a provider and
    # gives the patient ether for her transactions.
    doctor_public = world.root / "doctor" / "public.json"
    ok(
        kmsctl(
            "account",
            "public",
            *doctor.key(),
            "--profile",
            str(world.profile),
            "--out",
            str(doctor_public),
        )
    )
    assert json.loads(doctor_public.read_text())["did"] == doctor.did
    assert "granted PROVIDER_ROLE to " + doctor.did in _admin(world, "grant-provider", doctor.did)
    _admin(world, "fund", patient.did, "--ether", "1")

    own = patient.own(world.profile, world.blobs)
    assert f"registered {patient.did}" in ok(kmsctl("patient", "register", *own))
    lab, condition = world.root / "patient" / "lab.json", world.root / "patient" / "dx.json"
    lab.write_bytes(lab_result())
    condition.write_bytes(diagnosis())
    lab_id = json.loads(ok(kmsctl("patient", "store", str(lab), "--type", "lab_result", *own)))[
        "record_id"
    ]
    dx_id = json.loads(ok(kmsctl("patient", "store", str(condition), "--type", "diagnosis", *own)))[
        "record_id"
    ]
    granted = json.loads(
        ok(kmsctl("patient", "grant", str(doctor_public), "--types", "lab_result", *own))
    )
    assert granted["grantee"] == doctor.did
    assert sorted(granted["enrolled"]) == world.node_ids

    reader = doctor.own(world.profile, world.blobs)
    out = world.root / "doctor" / "lab.json"
    ok(kmsctl("provider", "read", lab_id, "--out", str(out), *reader))
    assert out.read_bytes() == lab_result()
    refused(kmsctl("provider", "read", dx_id, *reader), "does not cover record type diagnosis")
    # The probe: every read of a second is a JSON line; a refused record fails it.
    lines = world.root / "doctor" / "probe.jsonl"
    probe = ["provider", "probe", "--seconds", "1", "--readers", "2", "--out", str(lines)]
    ok(kmsctl(*probe, lab_id, *reader))
    served = [json.loads(line) for line in lines.read_text().splitlines()]
    assert served and all(r["error"] is None and r["seconds"] > 0 for r in served)
    refused(kmsctl(*probe, dx_id, *reader), "reads failed: [0-9]+ x PERMISSION_DENIED")

    ok(kmsctl("patient", "revoke", doctor.did, *own))
    refused(kmsctl("provider", "read", lab_id, *reader), "revoked")


def test_an_unfunded_then_unregistered_patient_is_told_what_to_run(world: World) -> None:
    patient = new_party(world.root / "newcomer", world.profile)
    own = patient.own(world.profile, world.blobs)
    refused(
        kmsctl("patient", "register", *own),
        f"account {patient.did} cannot pay for the gas .*kmsctl admin fund {patient.did}",
    )
    _admin(world, "fund", patient.did, "--ether", "0.1")
    lab = world.root / "newcomer" / "lab.json"
    lab.write_bytes(lab_result())
    blobs_before = set(world.blobs.iterdir()) if world.blobs.exists() else set()
    stored = kmsctl("patient", "store", str(lab), "--type", "lab_result", *own)
    refused(stored, "PatientNotRegistered")
    assert stored.stderr.splitlines()[-1] == (
        "kmsctl: next: the patient registers first: kmsctl patient register"
    )
    # The refused anchor left no blob behind.
    assert set(world.blobs.iterdir()) == blobs_before
    ok(kmsctl("patient", "register", *own))
    ok(kmsctl("patient", "store", str(lab), "--type", "lab_result", *own))


def test_emergency_roles_from_the_admins_keystore(world: World) -> None:
    patient = new_party(world.root / "patient-2", world.profile)
    responder = new_party(world.root / "responder", world.profile)
    _admin(world, "fund", patient.did, "--ether", "1")
    _admin(world, "fund", responder.did, "--ether", "1")
    own = patient.own(world.profile, world.blobs)
    ok(kmsctl("patient", "register", *own))
    lab = world.root / "patient-2" / "lab.json"
    lab.write_bytes(lab_result())
    stored = ok(kmsctl("patient", "store", str(lab), "--type", "lab_result", *own))
    lab_id = json.loads(stored)["record_id"]
    public = world.root / "responder" / "public.json"
    chain = ["--chain-id", str(world.chain_id)]
    ok(kmsctl("account", "public", *responder.key(), *chain, "--out", str(public)))

    opt_in = ["patient", "emergency-opt-in", str(public), "--types", "lab_result", *own]
    refused(kmsctl(*opt_in), "ResponderNotEmergencyRole")
    # A plain 0x address names a party as well as its DID.
    granted = _admin(world, "grant-emergency", responder.address)
    assert f"granted EMERGENCY_ROLE to {responder.did}" in granted
    assert json.loads(ok(kmsctl(*opt_in)))["responder"] == responder.did
    acting = responder.own(world.profile, world.blobs)
    opened = ok(kmsctl("emergency", "open", patient.did, "--duration", "600", *acting))
    assert f"emergency access to {patient.did} opened" in opened
    read = ["provider", "read", lab_id, "--purpose", "ETREAT", *acting]
    assert ok(kmsctl(*read)).rstrip("\n").encode() == lab_result()
    assert "revoked EMERGENCY_ROLE of" in _admin(world, "revoke-emergency", responder.did)
    refused(kmsctl(*read), "PERMISSION_DENIED|refused")


def test_the_admin_deactivates_and_activates_a_node(world: World) -> None:
    def active(node_id: str) -> bool:
        return next(n for n in world.registry.list_nodes() if n.node_id == node_id).active

    assert "node-3 deactivated" in _admin(world, "deactivate-node", "node-3")
    assert not active("node-3")
    assert "node-3 activated" in _admin(world, "activate-node", "node-3")
    assert active("node-3")


def test_account_show_needs_no_password_and_new_never_overwrites(world: World) -> None:
    party = new_party(world.root / "shown")
    shown = json.loads(
        ok(kmsctl("account", "show", "--keystore", str(party.keystore), "--chain-id", "5"))
    )
    assert shown == {"address": party.address, "did": f"did:pkh:eip155:5:{party.address}"}
    before = party.keystore.read_bytes()
    refused(kmsctl("account", "new", *party.key()), "exists")
    assert party.keystore.read_bytes() == before


def test_refusals_are_clear_and_carry_no_secret(world: World) -> None:
    party = new_party(world.root / "refusals", world.profile)
    home = party.home
    own = ["--profile", str(world.profile), "--blob-dir", str(world.blobs)]
    keystore = ["--keystore", str(party.keystore)]

    # Each a process of its own: what a person sees, exit code and all.
    wrong = secret_file(home / "wrong", "not " + PASSWORD)
    refused(
        run("cli.kmsctl", "patient", "register", *keystore, "--password-file", str(wrong), *own),
        "wrong password",
    )
    loose = home / "loose"
    loose.write_text(PASSWORD)
    loose.chmod(0o644)
    refused(
        kmsctl("patient", "register", *keystore, "--password-file", str(loose), *own), "chmod 600"
    )
    env = {**os.environ, "MEDKMS_TEST_PASSWORD": "wrong-" + PASSWORD}
    refused(
        run(
            "cli.kmsctl",
            "patient",
            "register",
            *keystore,
            "--password-env",
            "MEDKMS_TEST_PASSWORD",
            *own,
            env=env,
        ),
        "wrong password",
    )
    refused(
        kmsctl("patient", "register", *keystore, "--password-env", "MEDKMS_NO_SUCH_VAR", *own),
        "MEDKMS_NO_SUCH_VAR is not set",
    )
    # No terminal and no password source: a message, not a hang on a prompt.
    refused(kmsctl("patient", "register", *keystore, *own), "no password")

    nested, large = home / "nested.json", home / "large.json"
    nested.write_bytes(b"[" * 10_000)  # within the size bound: refused for its nesting
    large.write_bytes(b'{"version": 3, "pad": "' + b"x" * 100_000 + b'"}')
    for bad, message in [
        (nested, "nests deeper than 3 levels"),
        (large, "larger than 16384 bytes"),
    ]:
        refused(kmsctl("account", "show", "--keystore", str(bad)), message)
        refused(
            run(
                "cli.kmsctl",
                "provider",
                "read",
                "0x" + "11" * 32,
                "--keystore",
                str(bad),
                "--password-file",
                str(home / "password"),
                *own,
            ),
            message,
        )

    good = json.loads(next((world.root / "operators").glob("*/identity.json")).read_text())
    cases = [
        ({**good, "signing_public_key": "30" * 91}, "signing_public_key is not"),
        (
            {**good, "delivery_public_key": "02" + "ff" * 32},
            "delivery_public_key is not a compressed P-256",
        ),
        ({**good, "delivery_public_key": "02"}, "delivery_public_key must be 33 bytes"),
        ({**good, "account": "0x1234"}, "account must be an Ethereum address"),
        ({**good, "node_id": "../etc"}, "node_id must be"),
        ({**good, "tls": "x"}, "unknown field 'tls'"),
        ({k: v for k, v in good.items() if k != "account"}, "account is missing"),
    ]
    for document, message in cases:
        bad_identity = home / "identity.json"
        bad_identity.write_text(json.dumps(document))
        refused(
            kmsctl(
                "admin",
                "register-node",
                "--identity",
                str(bad_identity),
                "--endpoint",
                "h:1",
                "--profile",
                str(world.admin_profile),
                *world.admin.key(),
            ),
            message,
        )
    (home / "deep.json").write_bytes(b"{" * 50)
    refused(
        kmsctl(
            "admin",
            "register-node",
            "--identity",
            str(home / "deep.json"),
            "--endpoint",
            "h:1",
            "--profile",
            str(world.admin_profile),
            *world.admin.key(),
        ),
        "nests deeper than 1 level",
    )

    full = world.profile.read_text()
    no_registry = home / "no-registry.toml"
    no_registry.write_text(
        "\n".join(line for line in full.splitlines() if not line.startswith("registry_address"))
    )
    refused(
        kmsctl(
            "patient",
            "register",
            *party.key(),
            "--profile",
            str(no_registry),
            "--blob-dir",
            str(world.blobs),
        ),
        "registry_address is missing",
    )
    no_coordinator = home / "no-coordinator.toml"
    no_coordinator.write_text(world.admin_profile.read_text())
    refused(
        kmsctl("patient", "register", *party.own(no_coordinator, world.blobs)),
        "coordinator_address and tls_ca_cert are required",
    )
    other_chain = home / "other-chain.toml"
    other_chain.write_text(
        full.replace(f"chain_id = {world.chain_id}", "chain_id = 1").replace(
            "ca.pem", str(world.profile.parent / "ca.pem")
        )
    )
    refused(
        kmsctl("patient", "register", *party.own(other_chain, world.blobs)),
        "names chain 1, but the chain at its URL is chain",
    )
    refused(
        kmsctl("patient", "register", *party.key(), "--profile", str(world.profile)),
        "--blob-dir DIR is required",
    )
    refused(
        kmsctl(
            "patient", "register", *party.own(world.profile, world.blobs), "--state-dir", str(home)
        ),
        "--state-dir and --as are for the local cluster",
    )
    refused(
        kmsctl(
            "patient",
            "revoke",
            "did:pkh:eip155:1:" + party.address,
            *party.own(world.profile, world.blobs),
        ),
        "on chain 1, not on this profile's chain",
    )
    refused(
        kmsctl(
            "admin",
            "fund",
            party.did,
            "--ether",
            "-1",
            "--profile",
            str(world.admin_profile),
            *world.admin.key(),
        ),
        "--ether must be more than 0",
    )
