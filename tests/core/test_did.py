from __future__ import annotations

import pytest
from eth_account import Account

from core.did import MAX_DID_CHARS, Did, did_of, parse_did
from core.errors import InvalidRequest

ADDRESS = str(Account.create().address)


def test_a_did_names_the_chain_and_the_checksummed_account() -> None:
    did = did_of(31337, ADDRESS.lower())
    assert did == f"did:pkh:eip155:31337:{ADDRESS}"
    assert parse_did(did) == Did(31337, ADDRESS)
    assert str(parse_did(did)) == did


def test_an_all_lower_case_account_is_read_in_its_checksum_form() -> None:
    assert parse_did(f"did:pkh:eip155:1:{ADDRESS.lower()}").address == ADDRESS


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"did:ethr:{ADDRESS}", "must start with did:pkh:eip155:"),
        (f"did:pkh:eip155:{ADDRESS}", "chain id must be a decimal number"),
        (f"did:pkh:eip155:01:{ADDRESS}", "chain id must be a decimal number"),
        (f"did:pkh:eip155:0:{ADDRESS}", "chain id must be a decimal number"),
        (f"did:pkh:eip155:-1:{ADDRESS}", "chain id must be a decimal number"),
        (f"did:pkh:eip155:1:{ADDRESS[:-1]}", "40 hex digits"),
        (f"did:pkh:eip155:1:{ADDRESS}:extra", "40 hex digits"),
        ("did:pkh:eip155:1:0x" + "g" * 40, "40 hex digits"),
        (f"did:pkh:eip155:1:{ADDRESS[:2]}{ADDRESS[2:].swapcase()}", "EIP-55"),
        (f"did:pkh:eip155:{'9' * 33}:{ADDRESS}", "longer than"),
        (f"DID:PKH:EIP155:1:{ADDRESS}", "must start with"),
        ("", "must start with"),
    ],
    ids=[
        "another-method",
        "no-chain",
        "leading-zero",
        "chain-zero",
        "negative-chain",
        "short-address",
        "trailing-part",
        "not-hex",
        "bad-checksum",
        "too-long",
        "upper-case-prefix",
        "empty",
    ],
)
def test_a_malformed_did_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        parse_did(text)


def test_the_longest_did_fits_the_bound() -> None:
    longest = f"did:pkh:eip155:{'9' * 32}:{ADDRESS}"
    assert len(longest) == MAX_DID_CHARS
    assert parse_did(longest).chain_id == int("9" * 32)


@pytest.mark.parametrize("chain_id", [0, -1, True])
def test_did_of_refuses_a_chain_id_that_is_not_positive(chain_id: int) -> None:
    with pytest.raises(InvalidRequest, match="chain id"):
        did_of(chain_id, ADDRESS)


def test_did_of_refuses_a_non_address() -> None:
    with pytest.raises(InvalidRequest, match="not an Ethereum address"):
        did_of(1, "0x1234")
