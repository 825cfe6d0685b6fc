"""The tree's layout (ADR 8): each top-level folder is the package of its own name, and
no other installed distribution provides a package by one of those names."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "proto", "kms_node", "coordinator", "clients", "contracts", "deploy", "cli")


@pytest.mark.parametrize("name", PACKAGES)
def test_each_folder_is_the_package_of_its_name(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__ or "").resolve().parent == ROOT / name


def test_no_other_installed_distribution_provides_these_packages() -> None:
    providers = importlib.metadata.packages_distributions()
    clashes = {
        name: sorted(set(providers.get(name, [])) - {"medkms"})
        for name in (*PACKAGES, "benchmarks", "tests")
    }
    assert {name: dists for name, dists in clashes.items() if dists} == {}


def _package_imports() -> dict[str, set[str]]:
    """Which of the project's packages each imports (statically, from its modules)."""
    graph: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for name in PACKAGES:
        for path in (ROOT / name).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in graph and top != name:
                        graph[name].add(top)
    return graph


def test_no_package_imports_one_that_imports_it_back() -> None:
    graph = _package_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in graph[start]
        )

    cycles = sorted(name for name in PACKAGES if reaches(name, name, {name}))
    assert cycles == []


def test_the_layers_point_one_way() -> None:
    # core is pure and below everything; the command-line entry points (cli) compose the
    # system and nothing imports them.
    graph = _package_imports()
    assert graph["core"] == set()
    assert all("cli" not in imports for imports in graph.values())
