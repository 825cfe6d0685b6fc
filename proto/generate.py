"""Generate the Python gRPC stubs from the .proto files, or check them for drift.

    python -m proto.generate          # rewrite proto/kms/v1/*_pb2*.py{,i}
    python -m proto.generate --check  # exit 1 if the committed stubs differ

Only messages are generated: clients use the typed stubs in ``proto.stubs``
and servers register handlers through ``proto.rpc``, both built from
these descriptors. protoc writes imports as ``from kms.v1 import x_pb2``; the stubs live in
the ``proto`` package, so those imports are rewritten to the full package path.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "kms" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")
_IMPORT = re.compile(r"^from kms\.v1 import ", re.MULTILINE)


def _proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` and return the generated files."""
    protos = [str(p.relative_to(PROTO_ROOT)) for p in _proto_files()]
    grpc_include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its output above")
    out_dir = out_root / "kms" / "v1"
    files = sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    for path in files:
        path.write_text(_IMPORT.sub("from proto.kms.v1 import ", path.read_text()))
    return files


def drift() -> list[str]:
    """Names of generated files that differ from (or are missing in) the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    committed = {
        p.name: p.read_bytes() for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    names = sorted(set(fresh) | set(committed))
    return [n for n in names if fresh.get(n) != committed.get(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs have drifted")
    args = parser.parse_args()
    if args.check:
        stale = drift()
        if stale:
            print("generated stubs differ from the .proto files:", ", ".join(stale))
            print("run: python -m proto.generate")
            return 1
        print("generated stubs match the .proto files")
        return 0
    for path in generate(PROTO_ROOT):
        print("wrote", path.relative_to(PROTO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
