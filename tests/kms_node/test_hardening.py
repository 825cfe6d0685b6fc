"""A node process forbids core dumps and tracing by its own user."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import resource
from kms_node.hardening import forbid_core_dumps, is_dumpable
before = is_dumpable()
forbid_core_dumps()
print(before, is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))
"""


def test_forbid_core_dumps_in_a_fresh_process() -> None:
    # In a child: the settings cannot be undone in the test process itself.
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.split("\n")[0] == "True False (0, 0)"
