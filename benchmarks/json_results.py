"""How the single-scenario benchmarks (flood, hung node, coordinator restart) hand over
their results: printed as JSON, and written to ``--out`` when given."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def emit(results: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """The ``--out FILE`` option every such benchmark takes."""
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
