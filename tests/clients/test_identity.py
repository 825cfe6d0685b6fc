from __future__ import annotations

from pathlib import Path

import pytest

from medkms.clients.identity import Identity


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
    assert alice._seed.hex() not in shown
    with pytest.raises(TypeError):
        hash(alice)
