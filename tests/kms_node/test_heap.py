"""Giving the C heap's free memory back: glibc's malloc_trim where there is one, and nothing
(no error) where the C library has none."""

from __future__ import annotations

import ctypes
import platform

import pytest

from kms_node import heap


def test_memory_freed_in_the_heap_is_given_back_on_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.fail("this suite runs on glibc (Debian); elsewhere see the next test")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # Blocks below the mmap threshold live in the heap; once freed, glibc keeps them.
    blocks = [libc.malloc(32 * 1024) for _ in range(512)]
    for block in blocks:
        libc.free(block)
    assert heap.release_free_memory() is True


def test_without_malloc_trim_nothing_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_MALLOC_TRIM", None)
    assert heap.release_free_memory() is False
