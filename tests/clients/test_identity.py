from __future__ import annotations

from pathlib import Path

import pytest
import umbral_pre as umbral

from clients.sdk.identity import Identity, PublicIdentity, umbral_seed
from core.errors import InvalidRequest
from core.record_types import RecordType
from core.umbral_codec import VerificationError


def test_identity_roundtrip_keeps_every_key(tmp_path: Path) -> None:
    alice = Identity.generate("alice")
    path = tmp_path / "alice.json"
    alice.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = Identity.load(path)
    assert again.address == alice.address
    assert again.umbral_public_key() == alice.umbral_public_key()
    assert again.verifying_key() == alice.verifying_key()
    assert alice.umbral_public_key() != alice.verifying_key()


def test_secrets_are_not_printable() -> None:
    alice = Identity.generate("alice")
    shown = repr(alice) + str(alice)
    assert alice.account.key.hex() not in shown
    assert umbral_seed(bytes(alice.account.key)).hex() not in shown
    with pytest.raises(TypeError):
        hash(alice)


def test_each_record_type_has_its_own_key_and_they_survive_a_reload(tmp_path: Path) -> None:
    alice = Identity.generate("alice")
    keys = alice.record_public_keys()
    assert len(set(keys)) == len(RecordType)
    assert alice.umbral_public_key() not in keys  # the receiving key is separate
    alice.save(tmp_path / "a.json")
    assert Identity.load(tmp_path / "a.json").record_public_keys() == keys


def test_a_lab_result_kfrag_cannot_open_a_diagnosis() -> None:
    """The cryptographic half of type enforcement: even a node that ignored the grant's
    types and re-encrypted a diagnosis capsule with a lab-result kfrag produces a fragment
    that fails verification and cannot open the diagnosis key."""
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    bob_pk = bob.umbral_secret_key().public_key()
    lab_kfrags = umbral.generate_kfrags(
        delegating_sk=alice.record_secret_key(RecordType.LAB_RESULT),
        receiving_pk=bob_pk,
        signer=alice.kfrag_signer(),
        threshold=1,
        shares=1,
        sign_delegating_key=True,
        sign_receiving_key=True,
    )
    diagnosis_key = alice.record_public_key(RecordType.DIAGNOSIS)
    capsule, ciphertext = umbral.encrypt(diagnosis_key, b"d" * 32)
    cfrag = umbral.reencrypt(capsule, lab_kfrags[0])
    verifying_key = umbral.PublicKey.from_compressed_bytes(alice.verifying_key())
    with pytest.raises(VerificationError):
        umbral.CapsuleFrag.from_bytes(bytes(cfrag)).verify(
            capsule, verifying_key, diagnosis_key, bob_pk
        )
    with pytest.raises(ValueError):
        umbral.decrypt_reencrypted(
            bob.umbral_secret_key(), diagnosis_key, capsule, [cfrag], ciphertext
        )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[" * 60_000, "nests deeper than 1 level"),
        (b"{" + b" " * (64 * 1024) + b"}", "larger than 65536 bytes"),
        (b'["ethereum_key"]', "not a JSON object"),
        (b'{"ethereum_key": 5}', "AttributeError"),
        (b'{"ethereum_key": ["00"]}', "nests deeper than 1 level"),
        (b'{"ethereum_key": "' + b"11" * 32 + b'", "umbral_seed": "00"}', "format before ADR 11"),
        (b'{"ethereum_key": "zz"}', "ValueError"),
        (b"\xff\xfe", "not UTF-8"),
    ],
    ids=[
        "nested",
        "oversize",
        "a-list",
        "key-not-text",
        "key-a-list",
        "an-old-file",
        "key-not-hex",
        "not-utf8",
    ],
)
def test_a_broken_identity_file_is_an_invalid_request(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "id.json"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest, match=fragment) as excinfo:
        Identity.load(path)
    assert excinfo.value.message.startswith("cannot load identity")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x00\x01 not json", " is not JSON: "),
        (b"[]", " is not a JSON object"),
        (b'{"did": "x"}', ": it must hold exactly 'did' and 'umbral_public_key'"),
    ],
    ids=["not-json", "a-list", "a-missing-key"],
)
def test_a_broken_public_identity_file_is_named_once(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """It said ``public identity file bad.bin: public identity file bad.bin is not JSON``."""
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest) as raised:
        PublicIdentity.load(path)
    message = raised.value.message
    assert message.startswith(f"public identity file {path}{problem}")
    assert message.count(str(path)) == 1
