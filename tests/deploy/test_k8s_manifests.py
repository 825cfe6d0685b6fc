"""deploy/k8s: every object validates against the Kubernetes schemas (offline, bundled
with kubernetes-validate), the configs it carries load with the real settings loaders at
the paths it mounts, and the objects agree with each other (labels, ports, probes, the
Secrets they name)."""

from __future__ import annotations

import re
import shlex
import stat
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as k8s_schema
import pytest
import yaml

from cli.health import main as health_main
from coordinator.settings import CoordinatorSettings
from core.endpoints import parse_host_port
from deploy import generated_files
from kms_node.settings import NodeSettings, pin_file_mode_problem
from tests.deploy.k8s_objects import (
    K8S,
    MANIFESTS,
    config_text,
    container,
    containers,
    find,
    load,
    mount_of,
    objects,
    pod_spec,
)

#: the Kubernetes release the manifests are written for (the schemas they validate with)
KUBERNETES_VERSION = "1.33.0"
NODE_CONFIG = "/etc/medkms/node.toml"
COORDINATOR_CONFIG = "/etc/medkms/coordinator.toml"
README = (K8S / "README.md").read_text()


def _node() -> dict[str, Any]:
    return find("StatefulSet", "medkms-node-1")


def _coordinator() -> dict[str, Any]:
    return find("Deployment", "medkms-coordinator")


def _node_settings(tmp_path: Path, text: str | None = None) -> NodeSettings:
    config = tmp_path / "node.toml"
    config.write_text(config_text("medkms-node-1-config", "node.toml") if text is None else text)
    return NodeSettings.from_toml(config, environ={})


def _coordinator_settings(tmp_path: Path) -> CoordinatorSettings:
    config = tmp_path / "coordinator.toml"
    config.write_text(config_text("medkms-coordinator-config", "coordinator.toml"))
    return CoordinatorSettings.from_toml(config)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _port(workload: dict[str, Any], container_name: str, name: str) -> int:
    (port,) = [p for p in container(workload, container_name)["ports"] if p["name"] == name]
    number: int = port["containerPort"]
    return number


# -- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = load(path.read_text())
    assert len(docs) == 1, "one object per file"
    assert k8s_schema.validate(docs[0], KUBERNETES_VERSION, strict=True) == "1.33"


def test_the_validator_refuses_a_misspelt_field() -> None:
    """Strict validation: a field the schema does not know is an error, not ignored."""
    statefulset = _node()
    pod_spec(statefulset)["securityContext"]["runAsNonroot"] = True
    with pytest.raises(k8s_schema.ValidationError, match="runAsNonroot"):
        k8s_schema.validate(statefulset, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load((K8S / "kustomization.yaml").read_text())[0]
    assert sorted(kustomization["resources"]) == [str(p.relative_to(K8S)) for p in MANIFESTS]


def test_every_object_is_in_the_namespace_it_names() -> None:
    for obj in objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "medkms", obj["metadata"]["name"]


# -- the configs the manifests carry ---------------------------------------------------------


def test_the_node_config_loads_and_every_file_it_names_is_mounted(tmp_path: Path) -> None:
    settings = _node_settings(tmp_path)
    node = _node()
    assert settings.node_id == "node-1"
    assert settings.hsm_so_pin is not None
    assert settings.hsm_pin.file is not None and settings.hsm_so_pin.file is not None
    # what the serving container reads, and from which volume
    expected_volumes = {
        str(settings.hsm_pin.file): "pins",
        str(settings.tls_ca_cert): "tls",
        str(settings.tls_cert): "tls",
        str(settings.tls_key): "tls",
        str(settings.data_dir): "data",
        str(settings.softhsm_conf): "data",
        str(settings.softhsm_token_dir): "data",
        NODE_CONFIG: "config",
    }
    for path, volume in expected_volumes.items():
        assert mount_of(node, "node", path).volume["name"] == volume, path
        assert mount_of(node, "init", path).volume["name"] in (volume, "init-pins"), path
    # the SO PIN reaches the init container only
    assert mount_of(node, "init", str(settings.hsm_so_pin.file)).volume["name"] == "init-pins"
    pins = mount_of(node, "node", str(settings.hsm_pin.file)).volume
    assert [item["path"] for item in pins["secret"]["items"]] == ["user-pin"]


def test_every_mounted_file_the_configs_name_is_one_its_volume_provides(tmp_path: Path) -> None:
    node_settings = _node_settings(tmp_path)
    coordinator_settings = _coordinator_settings(tmp_path)
    assert node_settings.hsm_so_pin is not None
    files = [
        (_node(), "node", [node_settings.tls_ca_cert, node_settings.tls_cert]),
        (_node(), "node", [node_settings.tls_key, node_settings.hsm_pin.file]),
        (_node(), "init", [node_settings.hsm_pin.file, node_settings.hsm_so_pin.file]),
        (_coordinator(), "coordinator", [coordinator_settings.tls_ca_cert]),
        (_coordinator(), "coordinator", [coordinator_settings.tls_cert]),
        (_coordinator(), "coordinator", [coordinator_settings.tls_key]),
        (_coordinator(), "coordinator", [coordinator_settings.tls_client_cert]),
        (_coordinator(), "coordinator", [coordinator_settings.tls_client_key]),
    ]
    for workload, name, paths in files:
        for path in paths:
            assert path is not None
            mount = mount_of(workload, name, str(path))
            relative = str(path.relative_to(mount.path))
            assert relative in _volume_files(mount.volume), (name, str(path))


def _volume_files(volume: dict[str, Any]) -> set[str]:
    """The file names a Secret or projected volume provides: its items', or, for a whole
    Secret, the keys README.md creates it with."""
    if "projected" in volume:
        return {
            item["path"]
            for source in volume["projected"]["sources"]
            for item in source["secret"]["items"]
        }
    secret = volume["secret"]
    if "items" in secret:
        return {item["path"] for item in secret["items"]}
    return _readme_secret_keys(secret["secretName"])


def _readme_secret_keys(name: str) -> set[str]:
    """The keys of Secret ``name`` as README.md's `kubectl create secret` makes it."""
    for line in README.replace("\\\n", " ").splitlines():
        words = shlex.split(line) if "kubectl" in line else []
        if "secret" not in words:
            continue
        at = words.index("secret")
        kind, secret = words[at + 1 : at + 3]
        if secret == name and kind == "tls":
            return {"tls.crt", "tls.key"}
        if secret == name and kind == "generic":
            return {w.split("=")[1] for w in words if w.startswith("--from-file=")}
    raise AssertionError(f"README.md does not say how to create Secret {name}")


def test_the_pin_mount_lies_outside_the_data_and_token_directories(tmp_path: Path) -> None:
    """The loader refuses a PIN inside them; here, the mounts agree."""
    settings = _node_settings(tmp_path)
    assert settings.hsm_pin.file is not None
    data_mount = mount_of(_node(), "node", str(settings.data_dir)).path
    assert not settings.hsm_pin.file.is_relative_to(data_mount)
    # and the loader does refuse the PIN moved onto the volume
    text = config_text("medkms-node-1-config", "node.toml").replace(
        "/run/secrets/medkms/pins/user-pin", "/var/lib/medkms/user-pin"
    )
    with pytest.raises(Exception, match="lies inside"):
        _node_settings(tmp_path, text)


@pytest.mark.parametrize("volume", ["pins", "init-pins"])
def test_the_pin_files_mode_is_one_the_node_accepts(volume: str) -> None:
    """A Secret volume's files are root-owned, with the volume's defaultMode and the pod's
    fsGroup as their group; the node reads them as runAsUser, through that group."""
    node = _node()
    security = pod_spec(node)["securityContext"]
    (secret,) = [v for v in pod_spec(node)["volumes"] if v["name"] == volume]
    mode = stat.S_IFREG | secret["secret"]["defaultMode"]
    euid, groups = security["runAsUser"], frozenset([security["runAsGroup"], security["fsGroup"]])
    assert pin_file_mode_problem(mode, 0, security["fsGroup"], euid=euid, groups=groups) is None
    # the same file readable by others would be refused
    assert pin_file_mode_problem(mode | 0o004, 0, security["fsGroup"], euid=euid, groups=groups)


def test_the_coordinator_config_loads_and_names_each_node_at_its_service(
    tmp_path: Path,
) -> None:
    settings = _coordinator_settings(tmp_path)
    node_settings = _node_settings(tmp_path)
    assert settings.threshold <= len(settings.nodes)
    addresses = {n.node_id: n.address for n in settings.nodes}
    service = find("Service", "medkms-node-1")
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    expected = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{grpc_port}"
    assert addresses[node_settings.node_id] == expected
    assert parse_host_port(node_settings.listen, "listen")[1] == grpc_port
    assert _port(_node(), "node", "grpc") == grpc_port
    assert parse_host_port(settings.listen, "listen")[1] == _port(
        _coordinator(), "coordinator", "grpc"
    )


# -- how the objects fit together --------------------------------------------------------------


def test_every_service_selects_its_pods_and_their_named_ports() -> None:
    workloads = [o for o in objects() if o["kind"] in ("StatefulSet", "Deployment")]
    for service in (o for o in objects() if o["kind"] == "Service"):
        selected = [w for w in workloads if _matches(service["spec"]["selector"], _labels(w))]
        assert len(selected) == 1, service["metadata"]["name"]
        names = {p["name"] for c in containers(selected[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_every_workload_selector_matches_its_own_pods() -> None:
    for workload in (o for o in objects() if o["kind"] in ("StatefulSet", "Deployment")):
        assert _matches(workload["spec"]["selector"]["matchLabels"], _labels(workload))


def test_the_network_policy_admits_only_the_coordinator_to_grpc_and_prometheus_to_metrics(
    tmp_path: Path,
) -> None:
    policy = find("NetworkPolicy", "medkms-node-1")["spec"]
    settings = _node_settings(tmp_path)
    node, coordinator = _node(), _coordinator()
    assert _matches(policy["podSelector"]["matchLabels"], _labels(node))
    assert not _matches(policy["podSelector"]["matchLabels"], _labels(coordinator))
    assert policy["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r["from"] for r in policy["ingress"]}
    grpc_port = parse_host_port(settings.listen, "listen")[1]
    metrics_port = parse_host_port(settings.metrics_listen, "metrics_listen")[1]
    assert sorted(rules) == sorted([grpc_port, metrics_port])
    assert all(len(r["ports"]) == 1 for r in policy["ingress"])
    (coordinator_peer,) = rules[grpc_port]
    assert set(coordinator_peer) == {"podSelector"}  # this namespace's pods only
    assert _matches(coordinator_peer["podSelector"]["matchLabels"], _labels(coordinator))
    (prometheus_peer,) = rules[metrics_port]
    assert prometheus_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert "medkms-node-1.medkms" not in str(rules)  # no peer is the node itself


def test_prometheus_scrapes_the_nodes_and_the_coordinators_metrics_ports_and_loads_the_rules(
    tmp_path: Path,
) -> None:
    scrape = yaml.safe_load(config_text("medkms-prometheus-scrape", "medkms-scrape.yml"))
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == {"medkms-node", "medkms-coordinator"}
    name_label = "__meta_kubernetes_pod_label_app_kubernetes_io_name"
    metrics_listen = {
        "medkms-node": _node_settings(tmp_path).metrics_listen,
        "medkms-coordinator": _coordinator_settings(tmp_path).metrics_listen,
    }
    for job_name, workload, container_name in [
        ("medkms-node", _node(), "node"),
        ("medkms-coordinator", _coordinator(), "coordinator"),
    ]:
        keep = {
            r["source_labels"][0]: r["regex"]
            for r in jobs[job_name]["relabel_configs"]
            if r.get("action") == "keep"
        }
        assert keep[name_label] == _labels(workload)["app.kubernetes.io/name"]
        assert keep["__meta_kubernetes_pod_container_port_name"] == "metrics"
        metrics_port = parse_host_port(metrics_listen[job_name], "metrics")[1]
        assert _port(workload, container_name, "metrics") == metrics_port
    (rule_file,) = scrape["rule_files"]
    assert Path(rule_file).name == generated_files.RULES_KEY


def test_the_packaged_alert_rules_equal_the_source() -> None:
    packaged = find("ConfigMap", "medkms-prometheus-alerts")["data"]
    assert packaged == {generated_files.RULES_KEY: generated_files.RULES.read_text()}
    configmap = generated_files.RULES_CONFIGMAP
    assert generated_files.stale({configmap: generated_files.GENERATED[configmap]}) == []


def test_a_stale_copy_of_the_alert_rules_is_noticed(tmp_path: Path) -> None:
    copy = tmp_path / "alert-rules.yaml"
    copy.write_text(generated_files.rules_configmap("groups: []\n"))
    make = generated_files.GENERATED[generated_files.RULES_CONFIGMAP]
    assert generated_files.stale({copy: make}) == [copy]


# -- probes, security, secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workload", "name", "config"),
    [("node", "node", NODE_CONFIG), ("coordinator", "coordinator", COORDINATOR_CONFIG)],
)
def test_probes_run_kms_health_against_the_config_the_container_serves(
    workload: str, name: str, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = _node() if workload == "node" else _coordinator()
    spec = container(obj, name)
    probes = [spec[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in spec]
    assert {"readinessProbe", "livenessProbe"} <= set(spec)
    commands = {tuple(p["exec"]["command"]) for p in probes}
    assert len(commands) == 1, "every probe asks the same question"
    (command,) = commands
    assert command[:4] == ("kms-health", name, "--config", config)
    assert spec["args"] == [name]  # the entrypoint's role, whose default config is this one
    options = dict(zip(command[2::2], command[3::2], strict=True))
    if name == "node":
        probe_mount = mount_of(obj, name, options["--client-cert"])
        assert probe_mount.volume["secret"]["secretName"] == "medkms-node-1-probe-tls"
        assert mount_of(obj, name, options["--client-key"]) == probe_mount
    else:
        service = find("Service", "medkms-coordinator")["metadata"]
        assert options["--server-name"] == f"{service['name']}.{service['namespace']}.svc"
    # the command line is kms-health's own: it parses, and the probe goes on to read the
    # config (absent here; a bad flag would have stopped argparse with SystemExit first)
    assert health_main(list(command[1:])) == 2
    assert f"cannot read {name} config {config}" in capsys.readouterr().err


def test_pods_run_as_the_image_user_without_privileges() -> None:
    for workload in (_node(), _coordinator()):
        security = pod_spec(workload)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec(workload)["automountServiceAccountToken"] is False
        for spec in containers(workload):
            assert spec["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
            for kind in ("requests", "limits"):
                assert set(spec["resources"][kind]) == {"cpu", "memory"}, spec["name"]


def _secret_names(workload: dict[str, Any]) -> set[str]:
    names = set()
    for volume in pod_spec(workload)["volumes"]:
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            names.add(source["secret"]["name"])
    return names


def test_secrets_are_referenced_and_readme_says_how_to_create_each() -> None:
    referenced = _secret_names(_node()) | _secret_names(_coordinator())
    assert referenced == {
        "medkms-ca",
        "medkms-node-1-pins",
        "medkms-node-1-tls",
        "medkms-node-1-probe-tls",
        "medkms-coordinator-tls",
        "medkms-coordinator-client-tls",
    }
    for name in referenced:
        assert _readme_secret_keys(name)


def test_no_secret_material_is_inlined() -> None:
    assert not [o for o in objects() if o["kind"] == "Secret"]
    for workload in (_node(), _coordinator()):
        for spec in containers(workload):
            assert "env" not in spec and "envFrom" not in spec, spec["name"]
    for path in [*MANIFESTS, K8S / "kustomization.yaml", K8S / "README.md"]:
        text = path.read_text()
        assert "-----BEGIN" not in text, path
        long_hex = [h for h in re.findall(r"[0-9a-fA-F]{32,}", text) if set(h) != {"0"}]
        assert not long_hex, path


def test_the_node_template_makes_another_node(tmp_path: Path) -> None:
    """README.md's recipe: copy node-1's files, replace node-1 with node-3."""
    copies = [
        load(p.read_text().replace("node-1", "node-3"))[0]
        for p in sorted((K8S / "node-1").glob("*.yaml"))
    ]
    for obj in copies:
        k8s_schema.validate(obj, KUBERNETES_VERSION, strict=True)
    config = find("ConfigMap", "medkms-node-3-config", copies)["data"]["node.toml"]
    settings = _node_settings(tmp_path, config)
    assert (settings.node_id, settings.hsm_token_label) == ("node-3", "medkms-node-3")
    addresses = {n.node_id: n.address for n in _coordinator_settings(tmp_path).nodes}
    service = find("Service", "medkms-node-3", copies)["metadata"]["name"]
    assert addresses["node-3"].startswith(f"{service}.medkms.svc:")
    statefulset = find("StatefulSet", "medkms-node-3", copies)
    assert _secret_names(statefulset) == {
        "medkms-ca",
        "medkms-node-3-pins",
        "medkms-node-3-tls",
        "medkms-node-3-probe-tls",
    }
