"""Threshold bookkeeping: when to stop, and what to say when it fails."""

from __future__ import annotations

import pytest

from coordinator.threshold import FragmentCollector
from core.errors import AccessDenied, InsufficientFragments

NODES = ["node-1", "node-2", "node-3", "node-4", "node-5"]


def test_complete_after_threshold_valid_fragments() -> None:
    c = FragmentCollector(3, NODES)
    c.accept("node-2", b"a")
    c.reject("node-1", "UNAVAILABLE", "down")
    c.accept("node-4", b"b")
    assert not c.complete
    c.accept("node-5", b"c")
    assert c.complete
    assert c.fragments() == [("node-2", b"a"), ("node-4", b"b"), ("node-5", b"c")]


def test_hopeless_once_too_many_failed() -> None:
    c = FragmentCollector(3, NODES)
    for node in NODES[:2]:
        c.reject(node, "UNAVAILABLE", "connection refused")
    assert not c.hopeless
    c.reject("node-3", "DATA_LOSS", "bad cfrag")
    assert c.hopeless


def test_unavailable_error_names_every_failed_and_silent_node() -> None:
    c = FragmentCollector(3, NODES)
    c.accept("node-1", b"a")
    c.reject("node-2", "UNAVAILABLE", "connection refused")
    c.reject("node-3", "DATA_LOSS", "bad cfrag")
    c.reject("node-4", "UNAVAILABLE", "connection refused")
    error = c.error()
    assert isinstance(error, InsufficientFragments)
    assert error.grpc_status == "UNAVAILABLE"
    for node in ["node-2", "node-3", "node-4", "node-5"]:
        assert node in error.message
    assert "1 of 3" in error.message
    assert "node-5 (not awaited: threshold out of reach)" in error.message


def test_a_refusal_wins_over_outages() -> None:
    c = FragmentCollector(3, NODES)
    c.reject("node-1", "UNAVAILABLE", "connection refused")
    c.reject("node-2", "UNAVAILABLE", "connection refused")
    for node in NODES[2:]:
        c.reject(node, "PERMISSION_DENIED", "grant has been revoked by the patient")
    error = c.error()
    assert isinstance(error, AccessDenied)
    assert "grant has been revoked" in error.message
    assert "node-3, node-4, node-5" in error.message


def test_threshold_must_fit_the_nodes() -> None:
    with pytest.raises(ValueError):
        FragmentCollector(6, NODES)
    with pytest.raises(ValueError):
        FragmentCollector(0, NODES)
