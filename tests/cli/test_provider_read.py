"""`kmsctl provider read` with several records: one batch read whose records each end
on their own, the app (the SDK) stood in for by a fake."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cli import kmsctl as kmsctl_module
from cli import parties
from clients.sdk.provider import RecordRead
from core.audit import Receipt
from core.errors import AccessDenied, KmsError
from tests.cli.test_account import kmsctl

READ, OTHER, REFUSED = b"\x01" * 32, b"\x03" * 32, b"\x02" * 32
RECEIPT = Receipt(node_id="node-1", leaf_index=4, tree_size=5, entry_hash=b"\x07" * 32)


class FakeProvider:
    """Reads READ and OTHER, each with one receipt; REFUSED is refused."""

    def __enter__(self) -> FakeProvider:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def read_records_with_receipts(
        self, record_ids: Sequence[bytes], purpose_of_use: str
    ) -> dict[bytes, RecordRead | KmsError]:
        refused = AccessDenied("not granted access")
        refused.request_id = "req-7"
        outcomes: dict[bytes, RecordRead | KmsError] = {
            READ: RecordRead(b"{}", (RECEIPT,)),
            OTHER: RecordRead(b"[]", (RECEIPT,)),
        }
        return {r: outcomes.get(r, refused) for r in record_ids}

    def read_record_with_receipts(self, record_id: bytes, purpose_of_use: str) -> RecordRead:
        outcome = self.read_records_with_receipts([record_id], purpose_of_use)[record_id]
        assert isinstance(outcome, RecordRead)
        return outcome


@pytest.fixture(autouse=True)
def fake_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parties, "party", lambda _args: None)

    def provider(_me: Any) -> FakeProvider:
        return FakeProvider()

    monkeypatch.setattr(kmsctl_module, "_provider", provider)


def test_a_refused_record_is_named_and_the_others_are_kept(tmp_path: Path) -> None:
    out, receipts = tmp_path / "records", tmp_path / "receipts.json"
    code, _, err = kmsctl(
        "provider",
        "read",
        "0x" + READ.hex(),
        REFUSED.hex(),
        "--out",
        str(out),
        "--receipts-out",
        str(receipts),
    )
    assert code == 1
    assert f"kmsctl: 0x{REFUSED.hex()}: not granted access (request req-7)" in err
    assert [p.name for p in out.iterdir()] == [f"0x{READ.hex()}.json"]
    assert (out / f"0x{READ.hex()}.json").read_bytes() == b"{}"
    (kept,) = json.loads(receipts.read_text())
    assert (kept["node_id"], kept["leaf_index"]) == ("node-1", 4)


def test_records_written_out_are_their_readers_alone(tmp_path: Path) -> None:
    """Plaintext health data on disk is the owner's alone, whatever the umask: a new
    directory 0700, each record 0600, and a file there before with a wider mode is
    narrowed before the record is written into it."""
    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "records"
        assert kmsctl("provider", "read", READ.hex(), OTHER.hex(), "--out", str(out))[0] == 0
        single = tmp_path / "one.json"
        single.write_bytes(b"")
        single.chmod(0o644)
        assert kmsctl("provider", "read", READ.hex(), "--out", str(single))[0] == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    written = [*out.iterdir(), single]
    assert len(written) == 3
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert single.read_bytes() == b"{}"


def test_several_records_without_out_are_printed_in_the_order_asked() -> None:
    code, out, _ = kmsctl("provider", "read", OTHER.hex(), READ.hex())
    assert code == 0
    assert out == "[]\n{}\n"
