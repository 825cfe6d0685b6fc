"""deploy/container: the Dockerfile lints clean, installs what pyproject.toml and
constraints.txt say, runs as the user the manifests expect; and what the image would run,
its entrypoint, behaves as it would in the container, with the manifests' paths moved
under a temporary directory (no image can be built on these machines)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from eth_account import Account
from packaging.utils import canonicalize_name

from contracts.registry import RegistryClient
from deploy import generated_files, processes
from deploy.anvil import AnvilProcess, set_balance
from deploy.certs import ClusterCa
from tests.deploy.k8s_objects import ROOT, config_text, container, find, mount_of, pod_spec

CONTAINER = ROOT / "deploy" / "container"
DOCKERFILE = (CONTAINER / "Dockerfile").read_text()
ENTRYPOINT = CONTAINER / "entrypoint.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"
#: where the image expects its mounts, as the manifests mount them
IMAGE_PATHS = ("/etc/medkms", "/var/lib/medkms", "/run/secrets/medkms")


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )


def test_hadolint_passes() -> None:
    result = _hadolint(CONTAINER / "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_refuses_an_unpinned_package(tmp_path: Path) -> None:
    """The linter runs and does bite: the same file with softhsm2 unpinned fails."""
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(DOCKERFILE.replace("softhsm2=2.6.1-2.1", "softhsm2"))
    result = _hadolint(unpinned)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_the_image_installs_every_package_of_the_project() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", DOCKERFILE, re.MULTILINE))
    assert copied == top_level
    # non-editable, with every version pinned
    assert "--constraint constraints.txt /src" in DOCKERFILE
    assert " -e " not in DOCKERFILE and "--editable" not in DOCKERFILE


def test_constraints_pin_exactly_what_the_tests_run_with() -> None:
    pinned = {}
    for line in (CONTAINER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version
    closure = generated_files.closure()
    assert pinned == closure
    # and it agrees with pyproject.toml's own pins
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name, version = requirement.split("==")
        assert closure[canonicalize_name(name)] == version, requirement
    constraints = generated_files.CONSTRAINTS
    assert generated_files.stale({constraints: generated_files.GENERATED[constraints]}) == []


def test_make_setup_pins_everything_it_installs() -> None:
    """``make setup`` installs under deploy/dev-constraints.txt, which pins the dev extra's
    whole closure at the versions installed here: a fresh machine gets them, not what was
    published since (a new release of a dependency's dependency once failed the check
    above on a fresh clone)."""
    pins = generated_files.DEV_CONSTRAINTS
    assert generated_files.stale({pins: generated_files.GENERATED[pins]}) == []
    pinned = pins.read_text()
    runtime = generated_files.CONSTRAINTS.read_text().split("\n", 3)[-1]
    assert all(line in pinned.splitlines() for line in runtime.splitlines() if line)
    for name in ("pytest", "mypy", "regex", "pycryptodome"):
        assert f"\n{name}==" in pinned, name
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("--constraint deploy/dev-constraints.txt") == makefile.count(
        "pip install"
    )


def test_the_image_user_is_the_one_the_pods_run_as() -> None:
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    targets = re.findall(r"^FROM \S+ AS (\w+)$", DOCKERFILE, re.MULTILINE)
    assert targets[-2:] == ["coordinator", "node"] and users == ["10001:10001"] * 2
    assert "useradd --system --uid 10001 --gid 10001" in DOCKERFILE
    for workload in (
        find("StatefulSet", "medkms-node-1"),
        find("Deployment", "medkms-coordinator"),
    ):
        security = pod_spec(workload)["securityContext"]
        assert f"{security['runAsUser']}:{security['runAsGroup']}" == users[0]
    # the node's volume is made in the image for that user, at the path the pod mounts it
    made = re.search(r"install -d -o 10001 -g 10001 -m 0700 (\S+)", DOCKERFILE)
    assert made is not None
    volume = mount_of(find("StatefulSet", "medkms-node-1"), "node", made.group(1))
    assert (volume.path, volume.volume["name"]) == (made.group(1), "data")


def test_the_entrypoint_is_installed_where_the_image_runs_it() -> None:
    assert "COPY --chmod=0755 deploy/container/entrypoint.sh /usr/local/bin/medkms-entrypoint" in (
        DOCKERFILE
    )
    # tini is PID 1, so that the node is not: its workers would take that for its death
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/medkms-entrypoint"]' in DOCKERFILE
    assert os.access(ENTRYPOINT, os.X_OK)


def test_the_entrypoint_defaults_are_the_manifests_mount_paths() -> None:
    script = ENTRYPOINT.read_text()
    node = find("StatefulSet", "medkms-node-1")
    pin_dir = re.search(r"MEDKMS_PIN_DIR-(\S+)}", script)
    assert pin_dir is not None
    assert mount_of(node, "node", pin_dir.group(1)).path == pin_dir.group(1)
    defaults = dict(re.findall(r"^\s+([a-z|\s-]+)\) default_config=(\S+) ;;$", script, re.M))
    assert defaults == {
        "node | node-init": "/etc/medkms/node.toml",
        "coordinator": "/etc/medkms/coordinator.toml",
    }
    assert mount_of(node, "node", defaults["node | node-init"]).volume["name"] == "config"


# -- the entrypoint, run -------------------------------------------------------------------------


def _moved(text: str, root: Path) -> str:
    """A config with the image's mount paths moved under ``root``."""
    for path in IMAGE_PATHS:
        text = text.replace(f'"{path}', f'"{root}{path}')
    return text


def _run(role: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MEDKMS_CONFIG": str(root / "etc/medkms/node.toml"),
        "MEDKMS_PIN_DIR": str(root / "run/secrets/medkms/pins"),
        **env,
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), role],
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _mount_node(root: Path, *, pins: bool = True) -> None:
    """What the StatefulSet mounts, under ``root``: the config, the PINs (mode 0600: owned by
    this user here), the volume's directory as the image makes it."""
    config = root / "etc/medkms/node.toml"
    config.parent.mkdir(parents=True)
    config.write_text(_moved(config_text("medkms-node-1-config", "node.toml"), root))
    (root / "var/lib/medkms").mkdir(parents=True, mode=0o700)
    pin_dir = root / "run/secrets/medkms/pins"
    pin_dir.mkdir(parents=True, mode=0o700)
    if pins:
        for name in ("user-pin", "so-pin"):
            fd = os.open(pin_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(16).hex().encode())
            os.close(fd)


def test_an_unknown_role_is_refused_with_the_usage(tmp_path: Path) -> None:
    result = _run("serve", tmp_path)
    assert result.returncode == 64
    assert "usage: medkms-entrypoint node|node-init|coordinator (got 'serve')" in result.stderr


@pytest.mark.parametrize("role", ["node", "node-init", "coordinator"])
def test_a_missing_config_mount_is_named(tmp_path: Path, role: str) -> None:
    result = _run(role, tmp_path, MEDKMS_CONFIG=str(tmp_path / "absent.toml"))
    assert result.returncode == 64
    assert f"no config at {tmp_path}/absent.toml: mount the {role}'s TOML" in result.stderr


@pytest.mark.parametrize("role", ["node", "node-init"])
def test_a_missing_pin_mount_is_named(tmp_path: Path, role: str) -> None:
    _mount_node(tmp_path)
    result = _run(role, tmp_path, MEDKMS_PIN_DIR=str(tmp_path / "run/secrets/elsewhere"))
    assert result.returncode == 64
    assert f"no PINs mounted at {tmp_path}/run/secrets/elsewhere" in result.stderr


def test_an_empty_pin_mount_is_named(tmp_path: Path) -> None:
    _mount_node(tmp_path, pins=False)
    result = _run("node", tmp_path)
    assert result.returncode == 64
    assert "is empty: the Secret holds no PIN files" in result.stderr


def test_the_coordinator_runs_kms_coordinator_with_the_mounted_config(tmp_path: Path) -> None:
    """Past the entrypoint's checks, kms-coordinator reads the config and names the first
    mount it lacks (no PIN mount is needed)."""
    config = tmp_path / "etc/medkms/coordinator.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        _moved(config_text("medkms-coordinator-config", "coordinator.toml"), tmp_path)
    )
    result = _run("coordinator", tmp_path, MEDKMS_CONFIG=str(config))
    assert result.returncode == 1
    assert result.stderr == (
        f"kms-coordinator: cannot read CA bundle {tmp_path}/run/secrets/medkms/tls/ca.crt: "
        "No such file or directory\n"
    )


@pytest.mark.softhsm
def test_node_init_creates_the_token_on_the_volume_and_prints_the_identity(
    tmp_path: Path,
) -> None:
    """The init container's command, with the manifests' config and a real SoftHSM token;
    run again (a pod restart), it opens the same keys."""
    _mount_node(tmp_path)
    first = _run("node-init", tmp_path)
    assert first.returncode == 0, first.stderr
    identity = json.loads(first.stdout)
    assert identity["node_id"] == "node-1"
    assert set(identity) == {"node_id", "signing_public_key", "delivery_public_key", "account"}
    assert re.fullmatch(r"0x[0-9a-fA-F]{40}", identity["account"])
    volume = tmp_path / "var/lib/medkms"
    assert (volume / "softhsm2.conf").is_file() and any((volume / "tokens").iterdir())
    assert not list((tmp_path / "run").rglob("*.conf"))  # nothing written beside the PINs
    again = _run("node-init", tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == identity


def _probe_command(root: Path) -> list[str]:
    """The node's probe exactly as the StatefulSet runs it, its paths moved under ``root``."""
    spec = container(find("StatefulSet", "medkms-node-1"), "node")
    command: list[str] = spec["livenessProbe"]["exec"]["command"]
    return [_moved(f'"{word}', root)[1:] for word in command]


@pytest.mark.softhsm
@pytest.mark.anvil
def test_the_node_serves_from_the_mounts_and_passes_its_own_probe(tmp_path: Path) -> None:
    """init, then serve, through the entrypoint with the manifests' config and a real token,
    chain and TLS; the probe the StatefulSet runs passes while it serves and fails after
    SIGTERM, which reaches kms-node itself (the entrypoint execs it)."""
    root = tmp_path / "pod"
    with AnvilProcess(log_path=tmp_path / "anvil.log") as anvil:
        admin = Account.create()
        set_balance(anvil.rpc_url, admin.address, 10**21)
        registry = RegistryClient.deploy(anvil.rpc_url, admin)
        _mount_node(root)
        config = root / "etc/medkms/node.toml"
        grpc_port, metrics_port = processes.free_port(), processes.free_port()
        config.write_text(
            config.read_text()
            .replace("https://chain-rpc.example.invalid", anvil.rpc_url)
            .replace("0x" + "0" * 40, registry.address)
            .replace("0.0.0.0:7000", f"0.0.0.0:{grpc_port}")
            .replace("0.0.0.0:9100", f"127.0.0.1:{metrics_port}")
        )
        ca = ClusterCa.ensure(tmp_path / "ca")
        for mount, files in [("tls", ca.server_cert("node-1")), ("probe", ca.client_cert("probe"))]:
            (root / "run/secrets/medkms" / mount).mkdir(parents=True, exist_ok=True)
            shutil.copy(files.cert, root / "run/secrets/medkms" / mount / "tls.crt")
            shutil.copy(files.key, root / "run/secrets/medkms" / mount / "tls.key")
        shutil.copy(ca.ca_cert, root / "run/secrets/medkms/tls/ca.crt")
        assert _run("node-init", root).returncode == 0
        probe = _probe_command(root)
        assert probe[:2] == ["kms-health", "node"]
        probe[0] = str(Path(sys.executable).parent / "kms-health")
        log = (tmp_path / "node.log").open("w")
        node = subprocess.Popen(
            ["sh", str(ENTRYPOINT), "node"],
            env={
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "MEDKMS_CONFIG": str(config),
                "MEDKMS_PIN_DIR": str(root / "run/secrets/medkms/pins"),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while subprocess.run(probe, capture_output=True, check=False).returncode != 0:
                assert node.poll() is None, (tmp_path / "node.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the probe never passed"
                time.sleep(0.5)
            node.send_signal(signal.SIGTERM)
            assert node.wait(timeout=15) == 0
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
            log.close()
        stopped = subprocess.run(probe, capture_output=True, text=True, check=False)
        assert stopped.returncode == 1 and "UNAVAILABLE" in stopped.stderr
