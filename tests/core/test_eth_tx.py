"""Ethereum signatures and EIP-1559 transactions from a digest signer (pure)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from eth_account import Account
from eth_keys.datatypes import PrivateKey

from core.errors import IntegrityError, InvalidRequest
from core.eth_tx import (
    SECP256K1_ORDER,
    DigestSigner,
    address_of,
    recoverable_signature,
    sign_transaction,
    transaction_digest,
)

RECIPIENT = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"


def transfer(**changes: Any) -> dict[str, Any]:
    tx: dict[str, Any] = {
        "chainId": 31337,
        "nonce": 7,
        "gas": 21_000,
        "maxFeePerGas": 3 * 10**9,
        "maxPriorityFeePerGas": 10**9,
        "to": RECIPIENT,
        "value": 12_345,
        "data": b"",
    }
    tx.update(changes)
    return {k: v for k, v in tx.items() if v is not None}


def signer_of(key: PrivateKey) -> DigestSigner:
    def sign(digest: bytes) -> tuple[int, int, int]:
        signature = key.sign_msg_hash(digest)
        return signature.v, signature.r, signature.s

    return sign


@pytest.fixture
def key() -> PrivateKey:
    return PrivateKey(os.urandom(32))


def test_address_of_both_encodings(key: PrivateKey) -> None:
    expected = Account.from_key(key.to_bytes()).address
    assert address_of(key.public_key.to_bytes()) == expected
    assert address_of(b"\x04" + key.public_key.to_bytes()) == expected
    with pytest.raises(InvalidRequest):
        address_of(key.public_key.to_compressed_bytes())


def test_recoverable_signature_normalises_high_s(key: PrivateKey) -> None:
    public = key.public_key.to_bytes()
    flipped_seen = False
    for _ in range(16):
        digest = os.urandom(32)
        reference = key.sign_msg_hash(digest)  # low-S already
        # Both (r, s) and (r, n - s) are valid ECDSA; only the low one is accepted on-chain.
        for s in (reference.s, SECP256K1_ORDER - reference.s):
            v, r, low_s = recoverable_signature(digest, reference.r, s, public)
            assert (v, r, low_s) == (reference.v, reference.r, reference.s)
            flipped_seen |= s != low_s
    assert flipped_seen


def test_recoverable_signature_refuses_another_key(key: PrivateKey) -> None:
    digest = os.urandom(32)
    signature = key.sign_msg_hash(digest)
    other = PrivateKey(os.urandom(32)).public_key.to_bytes()
    with pytest.raises(IntegrityError, match="does not recover"):
        recoverable_signature(digest, signature.r, signature.s, other)
    with pytest.raises(IntegrityError, match="does not recover"):
        recoverable_signature(os.urandom(32), signature.r, signature.s, key.public_key.to_bytes())


@pytest.mark.parametrize(("r", "s"), [(0, 1), (1, 0), (SECP256K1_ORDER, 1), (1, SECP256K1_ORDER)])
def test_recoverable_signature_refuses_out_of_range(key: PrivateKey, r: int, s: int) -> None:
    with pytest.raises(IntegrityError, match="out of range"):
        recoverable_signature(os.urandom(32), r, s, key.public_key.to_bytes())


def test_recoverable_signature_wants_a_32_byte_digest(key: PrivateKey) -> None:
    with pytest.raises(InvalidRequest, match="32 bytes"):
        recoverable_signature(os.urandom(31), 1, 1, key.public_key.to_bytes())


def test_sign_transaction_matches_eth_account(key: PrivateKey) -> None:
    # eth-keys signs deterministically (RFC 6979), so the bytes must agree exactly.
    account = Account.from_key(key.to_bytes())
    for tx in (
        transfer(),
        transfer(data=bytes.fromhex("deadbeef"), value=0, type=2),
        transfer(
            type="0x2", accessList=[{"address": RECIPIENT, "storageKeys": ["0x" + "00" * 32]}]
        ),
        transfer(to=None, data=bytes.fromhex("6000"), gas=100_000),  # contract creation
    ):
        raw = sign_transaction(tx, signer_of(key))
        assert raw[0] == 0x02
        assert raw == bytes(account.sign_transaction(tx).raw_transaction)
        assert Account.recover_transaction(raw) == account.address


def test_transaction_digest_is_what_is_signed(key: PrivateKey) -> None:
    seen: list[bytes] = []

    def sign(digest: bytes) -> tuple[int, int, int]:
        seen.append(digest)
        return signer_of(key)(digest)

    sign_transaction(transfer(), sign)
    assert seen == [transaction_digest(transfer())]
    assert transaction_digest(transfer(nonce=8)) != seen[0]


@pytest.mark.parametrize(
    ("tx", "message"),
    [
        (transfer(nonce=None), "lacks nonce"),
        (transfer(chainId=None), "lacks chainId"),
        (transfer(gasPrice=10**9), "unsupported fields: gasPrice"),
        (transfer(**{"from": RECIPIENT}), "unsupported fields: from"),
        (transfer(type=0), "EIP-1559"),
        (transfer(type=1), "EIP-1559"),
        (transfer(chainId=0), "chainId"),
        (transfer(chainId=True), "chainId"),
        (transfer(chainId=-1), "chainId"),
        (transfer(to=RECIPIENT.lower()), "malformed transaction"),
        (transfer(value=-1), "value must be a non-negative integer"),
        (transfer(value="0x10"), "value must be a non-negative integer"),
        (transfer(nonce=2**64 - 1), "nonce must be"),
        (transfer(maxPriorityFeePerGas=4 * 10**9), "exceeds maxFeePerGas"),
        (transfer(data="not hex"), "malformed transaction"),
    ],
)
def test_malformed_transactions_are_refused(
    key: PrivateKey, tx: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        sign_transaction(tx, signer_of(key))


@pytest.mark.parametrize(
    "bad",
    [
        lambda v, r, s: (v + 27, r, s),  # legacy v
        lambda v, r, s: (v, r, SECP256K1_ORDER - s),  # high S
        lambda v, r, s: (v, 0, s),
    ],
)
def test_a_bad_signer_answer_is_refused(key: PrivateKey, bad: Any) -> None:
    def sign(digest: bytes) -> tuple[int, int, int]:
        result: tuple[int, int, int] = bad(*signer_of(key)(digest))
        return result

    with pytest.raises(InvalidRequest, match="signer returned"):
        sign_transaction(transfer(), sign)
