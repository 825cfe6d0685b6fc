"""The receipts file an auditor may bring: the signed receipts a requester kept, as a JSON
list (``kmsctl provider read --receipts-out FILE`` adds to it, ``kmsctl audit verify
--receipts FILE`` checks it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from clients.sdk.input_files import load_json
from core.audit import Receipt
from core.errors import InvalidRequest

# Bounds on the file (clients/sdk/input_files.py).
#: a receipt is under 1 KiB (its batch path at most 10 hashes): some 100 000 receipts
MAX_RECEIPTS_FILE_BYTES: Final = 64 * 1024 * 1024
#: a list of receipts, each an object, its batch path a list
RECEIPTS_FILE_DEPTH: Final = 3


def receipt_to_json(receipt: Receipt) -> dict[str, Any]:
    return {
        "node_id": receipt.node_id,
        "leaf_index": receipt.leaf_index,
        "tree_size": receipt.tree_size,
        "entry_hash": receipt.entry_hash.hex(),
        "signature": receipt.signature.hex(),
        "batch_start": receipt.batch_start,
        "batch_size": receipt.batch_size,
        "batch_path": [node.hex() for node in receipt.batch_path],
        # the holder's note, not signed (core.audit.Receipt); absent in older files
        "kept_for_request": receipt.kept_for_request,
        "kept_cfrag_hash": None
        if receipt.kept_cfrag_hash is None
        else receipt.kept_cfrag_hash.hex(),
    }


def load_receipts(path: Path) -> list[Receipt]:
    """A JSON list of receipts as :func:`receipt_to_json` writes them."""
    try:
        items = load_json(
            path, max_bytes=MAX_RECEIPTS_FILE_BYTES, max_depth=RECEIPTS_FILE_DEPTH, what="receipts"
        )
        if not isinstance(items, list):
            raise InvalidRequest(f"{path} must hold a JSON list of receipts")
        return [
            Receipt(
                node_id=str(item["node_id"]),
                leaf_index=int(item["leaf_index"]),
                tree_size=int(item["tree_size"]),
                entry_hash=bytes.fromhex(item["entry_hash"]),
                signature=bytes.fromhex(item["signature"]),
                batch_start=(None if item.get("batch_start") is None else int(item["batch_start"])),
                batch_size=int(item.get("batch_size", 1)),
                batch_path=tuple(bytes.fromhex(h) for h in item.get("batch_path", [])),
                kept_for_request=(
                    None if item.get("kept_for_request") is None else str(item["kept_for_request"])
                ),
                kept_cfrag_hash=(
                    None
                    if item.get("kept_cfrag_hash") is None
                    else bytes.fromhex(item["kept_cfrag_hash"])
                ),
            )
            for item in items
        ]
    except (ValueError, KeyError, TypeError) as e:
        # InvalidRequest is a ValueError too: keep its message.
        message = e.message if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"
        raise InvalidRequest(f"{path} is not a receipts file: {message}") from None


def save_receipts(path: Path, receipts: Sequence[Receipt]) -> None:
    """Add ``receipts`` to the receipts file at ``path`` (made if absent), written whole
    to a temporary file and renamed over it, so a crash leaves the old list or the new."""
    kept = load_receipts(path) if path.exists() else []
    text = json.dumps([receipt_to_json(r) for r in [*kept, *receipts]], indent=1) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
