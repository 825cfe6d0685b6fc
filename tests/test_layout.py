"""The tree's layout (ADR 8): each top-level folder is the package of its own name, and
no other installed distribution provides a package by one of those names."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "proto", "kms_node", "coordinator", "clients", "contracts", "deploy")


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
