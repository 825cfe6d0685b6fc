"""How the single-scenario benchmarks (flood, hung node, coordinator restart) hand over
their results: printed as JSON, and written to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(results: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
