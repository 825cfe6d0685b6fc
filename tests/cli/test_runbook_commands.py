"""Every command the README's runbook ("Running across hosts") writes out is one the real
command-line parsers accept as written: a new operator copies them literally."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from cli import coordinator, kmsctl, node

README = Path(__file__).resolve().parents[2] / "README.md"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "kmsctl": kmsctl.build_parser,
    "kms-node": node.build_parser,
    "kms-coordinator": coordinator.build_parser,
}


def runbook() -> str:
    text = README.read_text()
    start = text.index("## Running across hosts")
    return text[start : text.index("\n## ", start + 1)]


def runbook_commands() -> list[str]:
    """Each code span that starts with a command and gives options, its line breaks
    joined. A span without options names a command (``kmsctl admin fund``); one that
    elides them (``...``) is a sketch, not a command to copy."""
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", runbook()))
    return [s for s in spans if s.split(" ", 1)[0] in PARSERS and " -" in s and "..." not in s]


def test_the_runbook_writes_out_the_commands_of_every_step() -> None:
    commands = runbook_commands()
    # init, tls-request, tls-install, serve, rotate-kek; the coordinator's three; the
    # admin's, the CA's, the parties'
    for start in [
        "kmsctl account new",
        "kmsctl admin deploy",
        "kmsctl ca init",
        "kmsctl ca sign",
        "kms-node init",
        "kms-node tls-request",
        "kms-node tls-install",
        "kms-node serve",
        "kmsctl admin register-node",
        "kmsctl admin fund",
        "kms-coordinator tls-request",
        "kms-coordinator tls-install",
        "kms-coordinator serve",
        "kmsctl account public",
        "kmsctl provider probe",
        "kmsctl admin deactivate-node",
        "kms-node rotate-kek",
    ]:
        assert any(c.startswith(start) for c in commands), start


@pytest.mark.parametrize("command", runbook_commands())
def test_each_runbook_command_parses_as_written(command: str) -> None:
    program, *args = shlex.split(command)
    try:
        PARSERS[program]().parse_args(args)
    except SystemExit as e:  # argparse's usage error
        pytest.fail(f"README runbook command does not parse ({e.code}): {command}")
