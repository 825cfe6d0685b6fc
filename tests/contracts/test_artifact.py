"""The committed registry artifact is exactly what the pinned compiler makes of the source.

Needs node and the npm packages (``make test`` installs them); never skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contracts import build

SOURCE = build.CONTRACTS_DIR / "src" / "Registry.sol"


@pytest.fixture(scope="module")
def fresh() -> dict[str, Any]:
    return build.compile_artifact()


def test_committed_artifact_matches_a_fresh_compile(fresh: dict[str, Any]) -> None:
    committed = build.load_artifact()
    assert fresh == committed, "artifact drifted: run `python -m contracts.build`"


def test_committed_artifact_is_canonical_json() -> None:
    # Sorted keys, 2-space indent, trailing newline: byte-stable, so `--check` can compare bytes.
    text = build.ARTIFACT_PATH.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_artifact_records_how_it_was_built(fresh: dict[str, Any]) -> None:
    assert fresh["contractName"] == "Registry"
    assert fresh["sourceSha256"] == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    assert fresh["compiler"]["version"].startswith("0.8.28+")
    assert fresh["evmVersion"] == "cancun"
    assert fresh["optimizer"] == {"enabled": True, "runs": 200}
    assert fresh["bytecode"].startswith("0x") and len(fresh["bytecode"]) > 1000
    assert fresh["deployedBytecode"].startswith("0x")
    # EIP-170: deployed code must stay under 24576 bytes.
    assert (len(fresh["deployedBytecode"]) - 2) // 2 < 24576
    assert "pragma solidity 0.8.28;" in SOURCE.read_text(encoding="utf-8")
    errors = {e["name"] for e in fresh["abi"] if e["type"] == "error"}
    assert {
        "GranteeNotProvider",
        "NotRecordWriter",
        "CapsuleAlreadyAnchored",
        "GrantNotActive",
    } <= errors


def test_build_check_passes_on_the_committed_tree() -> None:
    assert build.drift() is False


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.replace("uint256 private constant MAX_URI_BYTES = 256;", "uint256 x"),
            "ParserError",
        ),
        (
            lambda s: s.replace(
                'import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";',
                'import "../../../etc/passwd";',
            ),
            "import not allowed",
        ),
    ],
)
def test_compile_fails_loudly(tmp_path: Path, edit: Any, message: str) -> None:
    # A copy of the script next to a broken source; NODE_PATH finds the repo's npm packages.
    (tmp_path / "src").mkdir()
    shutil.copy(build.COMPILE_SCRIPT, tmp_path / "compile.js")
    source = SOURCE.read_text(encoding="utf-8")
    broken = edit(source)
    assert broken != source
    (tmp_path / "src" / "Registry.sol").write_text(broken, encoding="utf-8")
    out = tmp_path / "out.json"
    node = shutil.which("node")
    assert node is not None, "node is required: run `make setup`"
    result = subprocess.run(
        [node, str(tmp_path / "compile.js"), str(out)],
        env={**os.environ, "NODE_PATH": str(build.NODE_MODULES)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not out.exists()
