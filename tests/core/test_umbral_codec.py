"""Parsing Umbral public keys from untrusted bytes (core/umbral_codec.py)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import umbral_pre as umbral

from core import umbral_codec
from core.errors import InvalidRequest
from core.umbral_codec import is_umbral_panic, load_public_key


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


def _cfrags_of_a_new_kfrag_set(
    delegating: umbral.SecretKey,
    receiving: umbral.SecretKey,
    signer: umbral.Signer,
    capsule: umbral.Capsule,
) -> list[umbral.VerifiedCapsuleFrag]:
    kfrags = umbral.generate_kfrags(
        delegating_sk=delegating,
        receiving_pk=receiving.public_key(),
        signer=signer,
        threshold=2,
        shares=3,
        sign_delegating_key=True,
        sign_receiving_key=True,
    )
    return [umbral.reencrypt(capsule, k) for k in kfrags]


def test_cfrags_of_one_kfrag_set_share_a_precursor_and_others_do_not_combine() -> None:
    delegating, receiving = umbral.SecretKey.random(), umbral.SecretKey.random()
    signer = umbral.Signer(umbral.SecretKey.random())
    capsule, ciphertext = umbral.encrypt(delegating.public_key(), b"the dek")
    first = _cfrags_of_a_new_kfrag_set(delegating, receiving, signer, capsule)
    renewed = _cfrags_of_a_new_kfrag_set(delegating, receiving, signer, capsule)
    precursors = {umbral_codec.cfrag_precursor(c) for c in first}
    assert len(precursors) == 1
    (precursor,) = precursors
    assert len(precursor) == umbral_codec.PUBLIC_KEY_SIZE
    assert (
        {umbral_codec.cfrag_precursor(c) for c in renewed}
        == {umbral_codec.cfrag_precursor(renewed[0])}
        != precursors
    )
    # From the bytes a node sends, unverified, the same.
    wire = umbral_codec.load_cfrag(bytes(first[1]))
    assert umbral_codec.cfrag_precursor(wire) == precursor
    # What the precursor tells apart is what cannot be combined.
    with pytest.raises(ValueError, match="not pairwise consistent"):
        umbral.decrypt_reencrypted(
            receiving_sk=receiving,
            delegating_pk=delegating.public_key(),
            capsule=capsule,
            verified_cfrags=[first[0], renewed[1]],
            ciphertext=ciphertext,
        )
    opened = umbral.decrypt_reencrypted(
        receiving_sk=receiving,
        delegating_pk=delegating.public_key(),
        capsule=capsule,
        verified_cfrags=[renewed[0], renewed[2]],
        ciphertext=ciphertext,
    )
    assert opened is not None and bytes(opened) == b"the dek"


#: mutants of each kind per run, seeded (20,000 each were run once by hand: no panic)
MUTANTS = 1500


@pytest.mark.parametrize("kind", ["capsule", "kfrag", "cfrag", "public key"])
def test_what_servers_parse_does_not_make_umbral_panic(kind: str) -> None:
    """A node parses capsules and kfrags, the coordinator cfrags, both public keys, from
    peers. Mutated bytes (a few bytes set to 0, 0xff or random, sometimes cut short) are
    parsed, and what parses is used as a server would use it (re-encrypted, verified):
    each refusal is an ``Exception``, never a panic (``is_umbral_panic``: a
    BaseException that ``except Exception`` would miss)."""
    delegating = umbral.SecretKey.random()
    receiving = umbral.SecretKey.random().public_key()
    signer = umbral.Signer(umbral.SecretKey.random())
    capsule, _ = umbral.encrypt(delegating.public_key(), bytes(32))
    kfrag = umbral.generate_kfrags(delegating, receiving, signer, 2, 3, True, True)[0]
    cfrag = umbral.reencrypt(capsule, kfrag)
    keys = (signer.verifying_key(), delegating.public_key(), receiving)

    def use_capsule(data: bytes) -> None:
        umbral.reencrypt(umbral.Capsule.from_bytes(data), kfrag)

    def use_kfrag(data: bytes) -> None:
        umbral.KeyFrag.from_bytes(data).verify(*keys)

    def use_cfrag(data: bytes) -> None:
        umbral.CapsuleFrag.from_bytes(data).verify(capsule, *keys)

    cases: dict[str, tuple[bytes, Callable[[bytes], object]]] = {
        "capsule": (bytes(capsule), use_capsule),
        "kfrag": (bytes(kfrag.unverify()), use_kfrag),
        "cfrag": (bytes(cfrag), use_cfrag),
        "public key": (bytes(receiving.to_compressed_bytes()), load_public_key),
    }
    sample, use = cases[kind]
    rng = random.Random(kind)
    for _ in range(MUTANTS):
        data = bytearray(sample)
        for _ in range(rng.choice((1, 2, 4, 8))):
            data[rng.randrange(len(data))] = rng.choice((0, 0xFF, rng.randrange(256)))
        if rng.random() < 0.1:
            del data[rng.randrange(len(data)) :]
        try:
            use(bytes(data))
        except Exception:  # noqa: S112 - a refusal is what is expected
            continue
        except BaseException as e:  # noqa: BLE001 - the point of the test
            assert not is_umbral_panic(e), f"umbral panicked on {bytes(data).hex()}: {e}"
            raise
