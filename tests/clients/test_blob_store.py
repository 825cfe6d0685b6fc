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
    with pytest.raises(NotFound, match="erased"):
        store.get(uri)


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
