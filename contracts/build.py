"""Compile the registry contract, or check the committed artifact for drift.

    python -m contracts.build          # rewrite contracts/artifacts/Registry.json
    python -m contracts.build --check  # exit 1 if the committed artifact differs

Compiling needs node and the repo's npm packages (``make setup``); loading the committed
artifact (``load_artifact``) needs neither, which is what deployments use.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from core.errors import PreconditionFailed

CONTRACTS_DIR = Path(__file__).resolve().parent
COMPILE_SCRIPT = CONTRACTS_DIR / "compile.js"
ARTIFACT_PATH = CONTRACTS_DIR / "artifacts" / "Registry.json"
NODE_MODULES = CONTRACTS_DIR.parent / "node_modules"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise PreconditionFailed("node is not installed; run `make setup`")
    if not (NODE_MODULES / "solc").is_dir() or not (NODE_MODULES / "@openzeppelin").is_dir():
        raise PreconditionFailed(f"npm packages missing under {NODE_MODULES}; run `make setup`")
    return node


def _compile_to(out_path: Path) -> None:
    """Run compile.js; a compiler error is fatal and its diagnostics go into the error."""
    result = subprocess.run(
        [_node(), str(COMPILE_SCRIPT), str(out_path)],
        cwd=CONTRACTS_DIR.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise PreconditionFailed(
            f"compiling the registry failed (compile.js exit {result.returncode}):\n"
            + result.stderr.strip()[-4000:]
        )
    if result.stderr:  # compiler warnings: show them, they are not fatal
        sys.stderr.write(result.stderr)


def _compile_text() -> str:
    with tempfile.TemporaryDirectory(prefix="medkms-contracts-") as tmp:
        out = Path(tmp) / "Registry.json"
        _compile_to(out)
        return out.read_text(encoding="utf-8")


def compile_artifact() -> dict[str, Any]:
    """Compile the source now (needs node) and return the artifact, writing nothing."""
    artifact: dict[str, Any] = json.loads(_compile_text())
    return artifact


def load_artifact() -> dict[str, Any]:
    """The committed artifact, read through the package (works installed, without node)."""
    text = (
        resources.files("contracts").joinpath("artifacts/Registry.json").read_text(encoding="utf-8")
    )
    artifact: dict[str, Any] = json.loads(text)
    return artifact


def drift() -> bool:
    """True when a fresh compile differs, byte for byte, from the committed artifact."""
    committed = ARTIFACT_PATH.read_bytes() if ARTIFACT_PATH.exists() else b""
    return _compile_text().encode("utf-8") != committed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the artifact has drifted")
    args = parser.parse_args()
    try:
        if args.check:
            if drift():
                print(f"{ARTIFACT_PATH.name} differs from a fresh compile of the source")
                print("run: python -m contracts.build")
                return 1
            print(f"{ARTIFACT_PATH.name} matches the source")
            return 0
        _compile_to(ARTIFACT_PATH)
    except PreconditionFailed as e:
        print(e.message, file=sys.stderr)
        return 1
    print("wrote", ARTIFACT_PATH.relative_to(CONTRACTS_DIR.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
