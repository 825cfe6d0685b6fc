"""The Kubernetes objects under deploy/k8s, read once, for the tests of the manifests and
of the image they run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: the files `kubectl apply -k` reads, besides kustomization.yaml
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@dataclass(frozen=True)
class Mount:
    """A container's volume mount, with the volume it mounts."""

    path: str
    volume: dict[str, Any]


def load(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def objects() -> list[dict[str, Any]]:
    return [obj for path in MANIFESTS for obj in load(path.read_text())]


def find(kind: str, name: str, among: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        o
        for o in (objects() if among is None else among)
        if o["kind"] == kind and o["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


def mounts(workload: dict[str, Any], container_name: str) -> list[Mount]:
    """Each mount of a container with its volume (a claim template counts as a volume)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "claim": claim}
    return [
        Mount(m["mountPath"], volumes[m["name"]])
        for m in container(workload, container_name)["volumeMounts"]
    ]


def mount_of(workload: dict[str, Any], container_name: str, path: str) -> Mount:
    """The mount a file at ``path`` is read from (the deepest one holding it)."""
    holding = [
        m for m in mounts(workload, container_name) if Path(path).is_relative_to(Path(m.path))
    ]
    assert holding, f"{path} is on no volume of container {container_name}"
    return max(holding, key=lambda m: len(m.path))


def config_text(configmap: str, key: str) -> str:
    text: str = find("ConfigMap", configmap)["data"][key]
    return text
