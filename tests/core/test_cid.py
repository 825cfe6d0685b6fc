from __future__ import annotations

import hashlib

import pytest

from core.cid import cid_for, digest_of
from core.errors import InvalidRequest


def test_cid_is_the_ipfs_raw_cidv1_of_the_bytes() -> None:
    # `ipfs add --cid-version 1 --raw-leaves` of b"hello" gives this address.
    assert cid_for(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"


def test_digest_roundtrip() -> None:
    data = b"record envelope"
    assert digest_of(cid_for(data)) == hashlib.sha256(data).digest()


@pytest.mark.parametrize("bad", ["", "Qm" + "x" * 44, "b" + "a" * 58, "../../etc/passwd"])
def test_rejects_what_is_not_our_cid(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        digest_of(bad)
