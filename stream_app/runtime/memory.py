"""What the worker's resident memory is made of, for operators and the soak benchmark.

Python's own allocations are a small part of a worker's RSS (tracemalloc saw ~200 MB of
1.2 GB in a soak); the rest is RocksDB (memtables and table readers per owned partition,
one block cache for the worker) and the C heap, including memory freed but not returned
to the OS.
Exporting both lets a growing RSS be attributed from a dashboard instead of a profiler.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Iterable

from stream_app.runtime import allocator
from stream_app.transport.storage import MemoryBudget

ROCKSDB_PROPERTIES = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


def rocksdb_memory(dbs: Iterable, budget: MemoryBudget) -> dict[str, int]:
    """Bytes by kind: memtables and table readers summed over the given rocksdict DBs (one
    per owned partition), block cache from the worker's shared cache (every DB would
    report that same cache; summing it would count it once per partition)."""
    total = dict.fromkeys(ROCKSDB_PROPERTIES, 0)
    for db in dbs:
        for kind, prop in ROCKSDB_PROPERTIES.items():
            total[kind] += db.property_int_value(prop) or 0
    total["block_cache"] = budget.usage()["block_cache"]
    return total


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc >= 2.33: no heap breakdown
        return None


_LIBC = _libc()


def malloc_heap() -> dict[str, int] | None:
    """C heap bytes: `in_use` by live allocations and `free`: resident but not in use, which
    the allocator keeps instead of returning to the OS. A free share that keeps growing is
    fragmentation, not a leak. Read from jemalloc when it is the allocator, else from glibc
    (mmapped blocks included); None where neither can say."""
    mallctl = allocator.mallctl()
    if mallctl is not None:
        return _jemalloc_heap(mallctl)
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def _jemalloc_heap(mallctl) -> dict[str, int] | None:
    """jemalloc's stats are a snapshot taken when its epoch is advanced."""
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    values = {}
    for name in (b"stats.allocated", b"stats.resident"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if mallctl(name, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None  # a jemalloc built without statistics
        values[name] = value.value
    allocated, resident = values[b"stats.allocated"], values[b"stats.resident"]
    return {"in_use": allocated, "free": max(0, resident - allocated)}
