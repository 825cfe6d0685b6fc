"""Parsing Umbral public keys from untrusted bytes (core/umbral_codec.py)."""

from __future__ import annotations

import pytest
import umbral_pre as umbral

from core.errors import InvalidRequest
from core.umbral_codec import load_public_key


def test_a_key_loaded_again_is_the_same_key() -> None:
    public = umbral.SecretKey.random().public_key()
    data = bytes(public.to_compressed_bytes())
    first = load_public_key(data)
    again = load_public_key(bytes(bytearray(data)))  # an equal, distinct object
    assert first == again == public
    assert bytes(again.to_compressed_bytes()) == data
    other = umbral.SecretKey.random().public_key()
    assert load_public_key(bytes(other.to_compressed_bytes())) == other != first


def test_a_point_off_the_curve_is_refused_every_time() -> None:
    # x = 0xff..ff is larger than the field prime: no point.
    bad = b"\x02" + b"\xff" * 32
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="requester_umbral_key is not a compressed"):
            load_public_key(bad, "requester_umbral_key")
    with pytest.raises(InvalidRequest, match="must be 33 bytes, got 32"):
        load_public_key(bad[:32])
