"""The receipts file an auditor may bring: the signed receipts a requester kept, as a JSON
list (``kmsctl provider read --receipts-out FILE`` adds to it, ``kmsctl audit verify
--receipts FILE`` checks it).

It is read bounded in size, nesting and count: parsing builds a Python object for every
array and object, some 60 bytes of memory for the 3 bytes of ``{},``, so a file of
empty objects would cost 20 times its size before anything could refuse it. It is
written owner-only (mode 0600): receipts say who read which record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from core import bounded_json
from core.audit import Receipt
from core.errors import InvalidRequest
from core.local_files import read_regular_file

# Bounds on the file (clients/sdk/input_files.py).
#: the most receipts a file holds: a read adds one per node that served it (the
#: threshold, say 3), so some 3 300 reads; a longer history is kept in several files
MAX_RECEIPTS: Final = 10_000
#: a receipt as save_receipts writes it is 600 to 1 000 bytes (a 72-byte DER signature,
#: up to 6 hashes of batch path for a batch of 64 records, a request id); 1.5 KiB leaves
#: room for the longest ids: 10 000 x 1536 bytes, some 14.6 MiB. Loading 10 000 such
#: receipts peaks at some 40 MiB; the costliest JSON per byte (short strings, distinct
#: keys, small numbers) at some 11 to 14 times the file, some 170 MiB, where 64 MiB
#: of ``[{},{},...]`` took 1.75 GB before they were counted (MAX_RECEIPTS_FILE_CONTAINERS).
MAX_RECEIPTS_FILE_BYTES: Final = MAX_RECEIPTS * 1536
#: a receipt is one object holding one array (its batch path), in one list
MAX_RECEIPTS_FILE_CONTAINERS: Final = 2 * MAX_RECEIPTS + 1
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
    # Each refusal up to the parsed list names the file (InvalidRequest); OSError is the
    # caller's to report.
    data = read_regular_file(path, max_bytes=MAX_RECEIPTS_FILE_BYTES, what="receipts file")
    try:
        items = bounded_json.loads(
            data,
            max_bytes=MAX_RECEIPTS_FILE_BYTES,
            max_depth=RECEIPTS_FILE_DEPTH,
            what=f"receipts file {path}",
            max_containers=MAX_RECEIPTS_FILE_CONTAINERS,
        )
    except bounded_json.TooManyContainers as e:
        raise InvalidRequest(
            f"receipts file {path} holds more than {MAX_RECEIPTS} receipts ({e.count} "
            "arrays and objects, where a receipt is one object and one array); keep "
            "receipts in several files"
        ) from None
    if not isinstance(items, list):
        raise InvalidRequest(f"{path} is not a receipts file: it must hold a JSON list")
    try:
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
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        # InvalidRequest is a ValueError too: keep its message. OverflowError: int() of a
        # float too large, should a number ever get past bounded_json as one.
        message = e.message if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"
        raise InvalidRequest(f"{path} is not a receipts file: {message}") from None


def save_receipts(path: Path, receipts: Sequence[Receipt]) -> None:
    """Add ``receipts`` to the receipts file at ``path`` (made if absent), written whole
    to a new temporary file (mode 0600) and renamed over it, so a crash leaves the old
    list or the new. A file :func:`load_receipts` could not read back is not written."""
    kept = load_receipts(path) if path.exists() else []
    everything = [*kept, *receipts]
    text = json.dumps([receipt_to_json(r) for r in everything], indent=1) + "\n"
    if len(everything) > MAX_RECEIPTS or len(text) > MAX_RECEIPTS_FILE_BYTES:
        raise InvalidRequest(
            f"receipts file {path} would hold more than {MAX_RECEIPTS} receipts or "
            f"{MAX_RECEIPTS_FILE_BYTES} bytes; keep these in a new file"
        )
    tmp = path.with_name(path.name + ".tmp")
    # A temporary left by a crash is ours to replace; O_EXCL then makes sure the file
    # written is a new one, so its mode is 0600 whatever the umask or the old file's.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
