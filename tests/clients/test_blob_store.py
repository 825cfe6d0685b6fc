from __future__ import annotations

import os
from pathlib import Path

import pytest

from clients.sdk.blob_store import MAX_BLOB_BYTES, LocalBlobStore
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


def test_a_planted_oversized_file_is_refused_after_its_bound(tmp_path: Path) -> None:
    """A shared blob directory is input: a huge file under a record's name is read no
    further than MAX_BLOB_BYTES + 1 bytes, then refused."""
    store = LocalBlobStore(tmp_path)
    uri = store.put(b"ciphertext")
    path = tmp_path / uri.removeprefix("blob:")
    with path.open("wb") as f:
        f.truncate(MAX_BLOB_BYTES + 1)  # sparse: no disk used
    with pytest.raises(IntegrityError, match=f"regular file of at most {MAX_BLOB_BYTES} bytes"):
        store.get(uri)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_blob_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO would hang a plain read, a link to /dev/zero would never end."""
    store = LocalBlobStore(tmp_path)
    uri = store.put(b"ciphertext")
    path = tmp_path / uri.removeprefix("blob:")
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(IntegrityError, match="is not a regular file"):
        store.get(uri)
