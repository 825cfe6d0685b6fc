"""EIP-712 structs declared on their dataclass fields: the encoding derived from the
declaration is the standard one, for every member type the declarations may use, as
eth_account's independent implementation computes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak

from core.eip712 import (
    ADDRESS,
    BYTES,
    BYTES32,
    STRING,
    UINT8,
    UINT64,
    UINT256,
    SignedStruct,
    signed_as,
)
from core.errors import InvalidRequest


@dataclass(frozen=True)
class Everything(SignedStruct):
    """One member of each type, and an array of each."""

    PRIMARY_TYPE: ClassVar[str] = "Everything"

    owner: str = field(metadata=signed_as("owner", ADDRESS))
    digest: bytes = field(metadata=signed_as("digest", BYTES32))
    small: int = field(metadata=signed_as("small", UINT8))
    medium: int = field(metadata=signed_as("medium", UINT64))
    large: int = field(metadata=signed_as("large", UINT256))
    blob: bytes = field(metadata=signed_as("blob", BYTES))
    text: str = field(metadata=signed_as("text", STRING))
    owners: tuple[str, ...] = field(metadata=signed_as("owners", ADDRESS.array()))
    digests: tuple[bytes, ...] = field(metadata=signed_as("digests", BYTES32.array()))
    smalls: tuple[int, ...] = field(metadata=signed_as("smalls", UINT8.array()))
    larges: tuple[int, ...] = field(metadata=signed_as("larges", UINT256.array()))
    blobs: tuple[bytes, ...] = field(metadata=signed_as("blobs", BYTES.array()))
    texts: tuple[str, ...] = field(metadata=signed_as("texts", STRING.array()))


def everything(**changes: Any) -> Everything:
    values: dict[str, Any] = {
        "owner": "0x" + "ab" * 20,
        "digest": bytes(range(32)),
        "small": 255,
        "medium": 2**64 - 1,
        "large": 2**256 - 1,
        "blob": b"\x00\x01\x02",
        "text": "Ärztin 👩‍⚕️",
        "owners": ["0x" + "01" * 20, "0x" + "02" * 20],
        "digests": (b"\x03" * 32,),
        "smalls": (0, 1, 200),
        "larges": (),
        "blobs": (b"", b"\xff" * 40),
        "texts": ("a", "", "治疗"),
    }
    return Everything(**(values | changes))


def reference_hash_struct(struct: SignedStruct) -> bytes:
    """eth_account's hashStruct of the struct's wallet JSON (the body of its EIP-712
    signable message)."""
    members = [{"name": m.name, "type": m.type.name} for m in type(struct).members()]
    data = {
        "types": {"EIP712Domain": [], struct.PRIMARY_TYPE: members},
        "primaryType": struct.PRIMARY_TYPE,
        "domain": {},
        "message": struct.message(),
    }
    return bytes(encode_typed_data(full_message=data).body)


def test_the_type_string_lists_the_members_in_declaration_order() -> None:
    assert Everything.encode_type() == (
        "Everything(address owner,bytes32 digest,uint8 small,uint64 medium,uint256 large,"
        "bytes blob,string text,address[] owners,bytes32[] digests,uint8[] smalls,"
        "uint256[] larges,bytes[] blobs,string[] texts)"
    )
    assert Everything.type_hash() == keccak(Everything.encode_type().encode())


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"larges": (0, 7, 2**255)},
        {"owners": (), "blobs": (), "texts": ("x",)},
        # Either side of the length up to which bytes and string hashes are kept.
        {"blob": b"\x07" * 64, "text": "t" * 64},
        {"blob": b"\x07" * 65, "text": "t" * 65, "blobs": (b"\x08" * 1000,)},
    ],
    ids=["sample", "large-array", "empty-arrays", "kept-hashes", "long-values"],
)
def test_hash_struct_equals_eth_account(changes: dict[str, Any]) -> None:
    struct = everything(**changes)
    assert struct.hash_struct() == reference_hash_struct(struct)
    # Hashed again (member hashes now kept), the same answer; another value, another one.
    assert everything(**changes).hash_struct() == struct.hash_struct()
    assert everything(**(changes | {"blob": b"\x09"})).hash_struct() != struct.hash_struct()
    assert everything(**(changes | {"text": "other"})).hash_struct() != struct.hash_struct()


def test_values_are_normalised_as_their_types_say() -> None:
    struct = everything()
    assert struct.owners == ("0x" + "01" * 20, "0x" + "02" * 20)  # a list became a tuple
    mixed = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
    assert everything(owner=mixed.lower()).owner == mixed  # EIP-55 checksum form


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"owner": "0x1234"}, "owner must be a 0x-prefixed 20-byte hex address"),
        ({"digest": b"\x01" * 31}, "digest must be 32 bytes"),
        ({"digest": "00" * 32}, "digest must be 32 bytes"),
        ({"small": 256}, "small must fit in a uint8"),
        ({"medium": -1}, "medium must fit in a uint64"),
        ({"large": 2**256}, "large must fit in a uint256"),
        ({"large": True}, "large must be an integer"),
        ({"blob": "00"}, "blob must be bytes"),
        ({"text": b"x"}, "text must be a string"),
        ({"smalls": (1, 2, 300)}, r"smalls\[2\] must fit in a uint8"),
        ({"digests": (b"\x01" * 32, b"")}, r"digests\[1\] must be 32 bytes"),
    ],
)
def test_a_value_its_type_cannot_hold_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        everything(**changes)


def test_a_field_that_does_not_say_how_it_is_signed_is_an_error() -> None:
    @dataclass(frozen=True)
    class Careless(SignedStruct):
        PRIMARY_TYPE: ClassVar[str] = "Careless"

        signed: str = field(metadata=signed_as("signed", STRING))
        forgotten: str = ""

    with pytest.raises(TypeError, match="Careless.forgotten does not say what it is signed as"):
        Careless("x")
