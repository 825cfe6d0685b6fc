from __future__ import annotations

from pathlib import Path

import pytest

from clients.sdk.blob_store import LocalBlobStore
from core.errors import IntegrityError, InvalidRequest, NotFound


def test_put_get_delete(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    uri = store.put(b"ciphertext")
    assert uri.startswith("blob:b")
    assert store.put(b"ciphertext") == uri  # content addressed: same bytes, same place
    assert store.get(uri) == b"ciphertext"
    assert store.delete(uri)
    with pytest.raises(NotFound) as excinfo:
        store.get(uri)
    # Which file is missing, and where it was looked for.
    cid = uri.removeprefix("blob:")
    assert f"blob {cid} is not in the blob store: no file {tmp_path / cid}" in excinfo.value.message
    assert "erased, or the record was stored in another blob directory" in excinfo.value.message


def test_add_says_whether_it_wrote_the_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    uri, written = store.add(b"ciphertext")
    assert written and store.get(uri) == b"ciphertext"
    assert store.add(b"ciphertext") == (uri, False)


def test_a_tampered_blob_is_detected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    uri = store.put(b"ciphertext")
    (tmp_path / uri.removeprefix("blob:")).write_bytes(b"cipherteXt")
    with pytest.raises(IntegrityError):
        store.get(uri)


def test_names_outside_the_store_are_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(InvalidRequest):
        store.get("blob:../../etc/passwd")
    with pytest.raises(NotFound):
        store.get("https://example.org/x")
