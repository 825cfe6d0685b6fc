"""`kms-health`, the command the Kubernetes probes run (deploy/k8s), against the real
cluster's nodes and coordinator over their real TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.health import main
from deploy import processes
from deploy.certs import ClusterCa
from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def probe_cert(cluster: LocalCluster) -> list[str]:
    """A client certificate of the probe's own, from the cluster's CA."""
    files = ClusterCa.ensure(cluster.state_dir / "tls").client_cert("probe")
    return ["--client-cert", str(files.cert), "--client-key", str(files.key)]


def _coordinator_config(cluster: LocalCluster) -> str:
    return str(cluster.state_dir / "coordinator.toml")


def test_a_serving_node_passes_the_command_the_probe_runs(
    cluster: LocalCluster, probe_cert: list[str]
) -> None:
    config = cluster.node("node-1").config
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kms-health"), "node", "--config", config, *probe_cert],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_a_node_that_does_not_answer_fails(
    cluster: LocalCluster, probe_cert: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same config with nothing listening on its port (a node that died)."""
    node = cluster.node("node-2")
    text = Path(node.config).read_text()
    port = node.address.rsplit(":", 1)[1]
    free = processes.free_port()
    moved = Path(node.config).with_name("node-moved.toml")
    moved.write_text(text.replace(f':{port}"', f':{free}"'))
    try:
        assert main(["node", "--config", str(moved), "--timeout", "1", *probe_cert]) == 1
    finally:
        moved.unlink()
    assert f"node at 127.0.0.1:{free} is not serving: UNAVAILABLE" in capsys.readouterr().err


def test_a_probe_without_a_certificate_from_the_nodes_ca_is_misconfigured(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cluster.node("node-1").config
    assert main(["node", "--config", config]) == 2
    assert "pass --client-cert and --client-key" in capsys.readouterr().err
    stranger = ClusterCa.ensure(tmp_path / "other-ca").client_cert("probe")
    argv = ["--client-cert", str(stranger.cert), "--client-key", str(stranger.key)]
    # checked against the node's CA before dialling: the probe's configuration, not "down"
    assert main(["node", "--config", config, "--timeout", "2", *argv]) == 2
    assert f"TLS certificate {stranger.cert} (issuer" in capsys.readouterr().err


def test_the_coordinator_passes_with_the_name_its_certificate_carries(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _coordinator_config(cluster)
    assert main(["coordinator", "--config", config, "--server-name", "coordinator"]) == 0
    # a name its certificate does not carry fails the TLS check
    assert main(["coordinator", "--config", config, "--server-name", "node-1"]) == 1
    assert "not serving: UNAVAILABLE" in capsys.readouterr().err
    assert main(["coordinator", "--config", config]) == 2
