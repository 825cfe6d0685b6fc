"""Parsing Umbral public keys from untrusted bytes (core/umbral_codec.py)."""

from __future__ import annotations

import pytest
import umbral_pre as umbral

from core import umbral_codec
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


def test_at_most_4096_parsed_keys_are_kept_and_a_bad_one_is_not() -> None:
    """ADR 13: requesters' keys are kept parsed, 4,096 at most, least recently used out."""
    umbral_codec._public_key.cache_clear()
    keys = [
        bytes(umbral.SecretKey.random().public_key().to_compressed_bytes()) for _ in range(4097)
    ]
    for data in keys:
        load_public_key(data)
    assert umbral_codec._public_key.cache_info().currsize == 4096
    with pytest.raises(InvalidRequest):
        load_public_key(b"\x02" + b"\xff" * 32)
    assert umbral_codec._public_key.cache_info().currsize == 4096
    hits = umbral_codec._public_key.cache_info().hits
    load_public_key(keys[-1])
    load_public_key(keys[0])  # the least recently used: parsed again
    assert umbral_codec._public_key.cache_info().hits == hits + 1
