"""Parties named as DIDs: ``did:pkh:eip155:<chain id>:<EIP-55 address>``.

The did:pkh method (W3C CCG) names a blockchain account by its CAIP-10 account id; for
Ethereum that is ``eip155:<chain id>:<address>``. Patients, providers, responders, the
registry admin and the nodes' accounts are all named this way in ``kmsctl``'s output and
in the FHIR export. This module is the one place a DID is written or read.

Rules this module follows:

- :func:`did_of` writes the address in its EIP-55 checksum form, so one account on one
  chain has exactly one DID.
- :func:`parse_did` accepts only that form: the method ``pkh``, the namespace ``eip155``,
  a decimal chain id without leading zeros (CAIP-2 allows up to 32 characters), and an
  address that is lower case, upper case or correctly checksummed. Anything else is
  ``InvalidRequest`` naming what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from core import addresses
from core.errors import InvalidRequest

PREFIX: Final = "did:pkh:eip155:"
#: a DID is a prefix, a chain id of at most 32 digits, a colon and 42 characters
MAX_DID_CHARS: Final = len(PREFIX) + 32 + 1 + 42
_CHAIN_ID: Final = re.compile(r"[1-9][0-9]{0,31}")


@dataclass(frozen=True)
class Did:
    """An Ethereum account on one chain; ``address`` is in EIP-55 form."""

    chain_id: int
    address: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.chain_id}:{self.address}"


def did_of(chain_id: int, address: str) -> str:
    """The did:pkh of ``address`` on chain ``chain_id``."""
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id < 1:
        raise InvalidRequest(f"a chain id must be a positive integer, not {chain_id!r}")
    if not addresses.is_valid(address):
        raise InvalidRequest("not an Ethereum address (0x and 40 hex digits, EIP-55 if mixed case)")
    return str(Did(chain_id, addresses.checksum(address)))


def parse_did(text: str) -> Did:
    """The chain and account a ``did:pkh:eip155`` DID names."""
    if not isinstance(text, str):
        raise InvalidRequest("a DID must be text")
    if len(text) > MAX_DID_CHARS:
        raise InvalidRequest(f"not a did:pkh DID: longer than {MAX_DID_CHARS} characters")
    if not text.startswith(PREFIX):
        raise InvalidRequest(f"not a did:pkh DID: it must start with {PREFIX}")
    chain, sep, address = text[len(PREFIX) :].partition(":")
    if not sep or not _CHAIN_ID.fullmatch(chain):
        raise InvalidRequest("not a did:pkh DID: the chain id must be a decimal number")
    if not addresses.is_valid(address):
        raise InvalidRequest(
            "not a did:pkh DID: the account must be 0x and 40 hex digits (EIP-55 if mixed case)"
        )
    return Did(int(chain), addresses.checksum(address))
