"""EIP-712 typed structured data: a struct is declared once, the rest is derived.

A signed struct is a frozen dataclass deriving from :class:`SignedStruct` whose
fields each say which member they are signed as::

    @dataclass(frozen=True)
    class Mail(SignedStruct):
        PRIMARY_TYPE: ClassVar[str] = "Mail"

        sender: str = field(metadata=signed_as("from", ADDRESS))
        contents: str = field(metadata=signed_as("contents", STRING))

From that declaration come the type string (``encodeType``), the type hash, the
check of each field's value, ``hashStruct`` and the JSON a wallet is shown
(``eth_signTypedData_v4``), so they cannot disagree. Members are atomic types,
``bytes``, ``string`` or arrays of those; never structs, so a struct's
``encodeType`` is its own alone. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Final

from eth_hash.auto import keccak

from core.addresses import checksum, is_valid
from core.errors import InvalidRequest
from core.formats import hex_0x

WORD: Final = 32


def _checked_address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("0x") or not is_valid(value):
        raise InvalidRequest(f"{what} must be a 0x-prefixed 20-byte hex address")
    return checksum(value)


def _checked_bytes32(value: Any, what: str) -> bytes:
    # Exact size: abi encoders right-pad shorter values, which would make two
    # different inputs sign the same.
    if not isinstance(value, bytes) or len(value) != WORD:
        raise InvalidRequest(f"{what} must be {WORD} bytes")
    return value


def _checked_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidRequest(f"{what} must be bytes")
    return value


def _checked_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    return value


def _address_word(address: str) -> bytes:
    """An ``address`` member's word: the 20 bytes, left-padded with zeros."""
    return bytes(12) + bytes.fromhex(address[2:])


def _uint_word(value: int) -> bytes:
    """A ``uint`` member's word, big-endian (the value was checked to fit)."""
    return value.to_bytes(WORD, "big")


# A ``bytes`` or ``string`` member is hashed on its own (encodeData), and the same values
# come back request after request (a requester's Umbral key, a purpose of use): their
# hashes are kept, a bounded number of short values only (one keccak256 costs about 5 us
# through eth-hash, and a request has two such members).
_HASHES_KEPT: Final = 4096
_KEPT_UP_TO_BYTES: Final = 64


@lru_cache(maxsize=_HASHES_KEPT)
def _short_hash(value: bytes) -> bytes:
    return keccak(value)


def _bytes_hash(value: bytes) -> bytes:
    return _short_hash(value) if len(value) <= _KEPT_UP_TO_BYTES else keccak(value)


def _string_hash(value: str) -> bytes:
    return _bytes_hash(value.encode("utf-8"))


@dataclass(frozen=True)
class MemberType:
    """An EIP-712 member type: its name in a type string, what a value of it must be
    (``check`` returns it normalised, or raises InvalidRequest naming ``what``), the
    32-byte word ``encodeData`` makes of it, and how a wallet's JSON shows it."""

    name: str
    check: Callable[[Any, str], Any]
    word: Callable[[Any], bytes]
    json: Callable[[Any], Any]

    def array(self) -> MemberType:
        """``T[]``, held as a tuple; encodeData: keccak256 of the concatenation of the
        elements' words."""

        def check(value: Any, what: str) -> tuple[Any, ...]:
            return tuple(self.check(item, f"{what}[{i}]") for i, item in enumerate(value))

        return MemberType(
            f"{self.name}[]",
            check,
            lambda items: keccak(b"".join(self.word(item) for item in items)),
            lambda items: [self.json(item) for item in items],
        )


def _uint(bits: int) -> MemberType:
    def check(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{what} must be an integer")
        if not 0 <= value < 2**bits:
            raise InvalidRequest(f"{what} must fit in a uint{bits}")
        return value

    return MemberType(f"uint{bits}", check, _uint_word, int)


# Atomic types are one word each (addresses are held in their EIP-55 checksum form);
# the dynamic ``bytes`` and ``string`` encode as the keccak256 of their contents.
ADDRESS: Final = MemberType("address", _checked_address, _address_word, str)
BYTES32: Final = MemberType("bytes32", _checked_bytes32, bytes, hex_0x)
UINT8: Final = _uint(8)
UINT64: Final = _uint(64)
UINT256: Final = _uint(256)
BYTES: Final = MemberType("bytes", _checked_bytes, _bytes_hash, hex_0x)
STRING: Final = MemberType("string", _checked_string, _string_hash, str)


@dataclass(frozen=True)
class Member:
    """One member of a struct type: its name as signed, and its type."""

    name: str
    type: MemberType


_MEMBER: Final = "eip712_member"


def signed_as(name: str, member_type: MemberType) -> Mapping[str, Member]:
    """A dataclass field's metadata: the member it is signed as. The member's name is
    written out rather than derived from the field's, so that renaming a field cannot
    change what is signed."""
    return {_MEMBER: Member(name, member_type)}


class SignedStruct:
    """Base of the signed structs: see the module's docstring. The dataclass's fields,
    in order, are the struct type's members; each field is checked (and normalised) as
    its member's type says when the struct is made."""

    PRIMARY_TYPE: ClassVar[str]
    # Makes every subclass a dataclass to type checkers, as typeshed's DataclassInstance.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for attribute, member in _struct_type(type(self)).members:
            value = member.type.check(getattr(self, attribute), attribute)
            object.__setattr__(self, attribute, value)

    @classmethod
    def members(cls) -> tuple[Member, ...]:
        return tuple(member for _, member in _struct_type(cls).members)

    @classmethod
    def encode_type(cls) -> str:
        """EIP-712 ``encodeType``: ``Name(type1 name1,type2 name2,...)``."""
        return _struct_type(cls).encoded

    @classmethod
    def type_hash(cls) -> bytes:
        """EIP-712 ``typeHash = keccak256(encodeType(typeOf(s)))``."""
        return _struct_type(cls).type_hash

    def hash_struct(self) -> bytes:
        """EIP-712 ``hashStruct(s) = keccak256(typeHash || encodeData(s))``, encodeData
        being each member's word in declaration order."""
        struct_type = _struct_type(type(self))
        words = (m.type.word(getattr(self, attribute)) for attribute, m in struct_type.members)
        return keccak(struct_type.type_hash + b"".join(words))

    def message(self) -> dict[str, Any]:
        """The struct as the JSON of ``eth_signTypedData_v4`` shows it; JSON-serialisable."""
        return {
            m.name: m.type.json(getattr(self, attribute))
            for attribute, m in _struct_type(type(self)).members
        }


@dataclass(frozen=True)
class _StructType:
    """What a SignedStruct class declares, worked out once per class."""

    #: (dataclass field name, member), in order
    members: tuple[tuple[str, Member], ...]
    encoded: str
    type_hash: bytes


_STRUCT_TYPES: dict[type[SignedStruct], _StructType] = {}


def _struct_type(struct: type[SignedStruct]) -> _StructType:
    known = _STRUCT_TYPES.get(struct)
    if known is None:
        members = []
        for f in dataclasses.fields(struct):
            if _MEMBER not in f.metadata:
                raise TypeError(f"{struct.__name__}.{f.name} does not say what it is signed as")
            members.append((f.name, f.metadata[_MEMBER]))
        types = ",".join(f"{m.type.name} {m.name}" for _, m in members)
        encoded = f"{struct.PRIMARY_TYPE}({types})"
        known = _STRUCT_TYPES[struct] = _StructType(
            tuple(members), encoded, keccak(encoded.encode())
        )
    return known
