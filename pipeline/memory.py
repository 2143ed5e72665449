"""Giving memory that is free but still held back to the operating system, between the stages of a run.

Two allocators keep freed memory for reuse: pyarrow's pool (mimalloc or jemalloc) after a
pass over the shards, and glibc's heap, which serves allocations of up to 32 MB (its
mmap threshold rises to the largest block freed) and returns free pages only at the top
of the heap. On the full CIFAR run both together held several GB through the later
stages (docs/results.md, "Where the memory goes"). Best effort: a no-op where an
allocator has nothing to give or the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache

import pyarrow as pa


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_read_pool() -> None:
    """Hand pyarrow's pooled pages (kept from reading the shards) back to the OS."""
    pa.default_memory_pool().release_unused()


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim``); a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_unused() -> None:
    """Collect garbage, then give back pyarrow's pooled pages and glibc's free heap pages."""
    gc.collect()
    release_read_pool()
    trim_heap()
