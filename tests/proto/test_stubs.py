"""The generated stubs are exactly what the .proto files produce."""

from __future__ import annotations

from proto.generate import drift


def test_generated_stubs_match_the_proto_files() -> None:
    assert drift() == []
