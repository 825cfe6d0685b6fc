"""Content-addressed blob store on local disk.

Blobs are written atomically (temp file, fsync, rename) under their CID and
checked against it on every read, so a corrupted or swapped file is detected.
The directory may be shared or synced, so what lies there is input like any other:
only a regular file is read, and no further than :data:`MAX_BLOB_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from clients.sdk.records import MAX_DOCUMENT_BYTES
from core.cid import cid_for, digest_of
from core.errors import IntegrityError, NotFound

STORAGE_SCHEME = "blob:"
#: the largest blob read: a record envelope holds a document of at most
#: MAX_DOCUMENT_BYTES, encrypted, with its capsule, nonce, wrapped key and ids (well
#: under 64 KiB more)
MAX_BLOB_BYTES = MAX_DOCUMENT_BYTES + 64 * 1024


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: str) -> Path:
        digest_of(cid)  # validates the name before it touches the file system
        return self.root / cid

    def put(self, data: bytes) -> str:
        """Store ``data``; return its storage URI (``blob:<cid>``)."""
        return self.add(data)[0]

    def add(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return its storage URI and whether this call wrote the file
        (False: the store held it already), so that a writer whose anchor is refused
        deletes only what it added."""
        cid = cid_for(data)
        path = self._path(cid)
        if path.exists():
            return STORAGE_SCHEME + cid, False
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return STORAGE_SCHEME + cid, True

    def get(self, uri: str) -> bytes:
        cid = _cid_of(uri)
        digest = digest_of(cid)  # validates the name before it touches the file system
        path = self.root / cid
        try:
            data = _read_regular(path, MAX_BLOB_BYTES)
        except FileNotFoundError:
            raise NotFound(
                f"blob {cid} is not in the blob store: no file {path} (erased, or the record "
                "was stored in another blob directory: the patient's --blob-dir)"
            ) from None
        if data is None:
            raise IntegrityError(
                f"blob {cid} is not a regular file of at most {MAX_BLOB_BYTES} bytes: {path}"
            )
        if hashlib.sha256(data).digest() != digest:
            raise IntegrityError(f"blob {cid} does not match its content address")
        return data

    def delete(self, uri: str) -> bool:
        try:
            self._path(_cid_of(uri)).unlink()
        except FileNotFoundError:
            return False
        return True


def _read_regular(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of ``path``, or None if it is not a regular file (a FIFO, a device) or
    holds more than ``max_bytes``. Opened without blocking, so a FIFO cannot hang the
    read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(max_bytes + 1)
    return data if len(data) <= max_bytes else None


def _cid_of(uri: str) -> str:
    if not uri.startswith(STORAGE_SCHEME):
        raise NotFound(f"storage URI {uri[:80]!r} is not in this blob store")
    return uri[len(STORAGE_SCHEME) :]
