"""One serving instance per data directory (kms_node/data_lock.py): a second is refused
at once, and the directory is free again when the first lets go (the kernel lets go
when its process ends, however it ends)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import PreconditionFailed
from kms_node import data_lock


def test_a_second_serving_instance_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    first = data_lock.hold_as_the_serving_instance(tmp_path)
    with pytest.raises(PreconditionFailed, match="another kms-node serves from it"):
        data_lock.hold_as_the_serving_instance(tmp_path)
    # Worker processes share the directory with their instance (and with each other).
    data_lock.hold_while_serving(tmp_path)
    os.close(first)
    os.close(data_lock.hold_as_the_serving_instance(tmp_path))


def test_another_directory_is_another_node(tmp_path: Path) -> None:
    one = data_lock.hold_as_the_serving_instance(tmp_path / "node-1")
    two = data_lock.hold_as_the_serving_instance(tmp_path / "node-2")
    os.close(one)
    os.close(two)
