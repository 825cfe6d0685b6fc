"""Content-addressed blob store on local disk.

Blobs are written atomically (temp file, fsync, rename) under their CID and
checked against it on every read, so a corrupted or swapped file is detected.
The directory may be shared or synced, so what lies there is input like any other:
only a regular file is read, and no further than :data:`MAX_BLOB_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from clients.sdk.records import MAX_DOCUMENT_BYTES
from core.cid import cid_for, digest_of
from core.errors import IntegrityError, InvalidRequest, NotFound
from core.local_files import read_regular_file

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
            data = read_regular_file(path, max_bytes=MAX_BLOB_BYTES, what="blob")
        except FileNotFoundError:
            raise NotFound(
                f"blob {cid} is not in the blob store: no file {path} (erased, or the record "
                "was stored in another blob directory: the patient's --blob-dir)"
            ) from None
        except InvalidRequest:  # a FIFO, a device, a directory, or too large
            raise IntegrityError(
                f"blob {cid} is not a regular file of at most {MAX_BLOB_BYTES} bytes: {path}"
            ) from None
        if hashlib.sha256(data).digest() != digest:
            raise IntegrityError(f"blob {cid} does not match its content address")
        return data

    def delete(self, uri: str) -> bool:
        try:
            self._path(_cid_of(uri)).unlink()
        except FileNotFoundError:
            return False
        return True


def _cid_of(uri: str) -> str:
    if not uri.startswith(STORAGE_SCHEME):
        raise NotFound(f"storage URI {uri[:80]!r} is not in this blob store")
    return uri[len(STORAGE_SCHEME) :]
