"""Memory attribution helpers (stream_app/runtime/memory.py) against a real RocksDB and the real
C library: the soak and the Grafana memory panels read these numbers."""
from __future__ import annotations

import platform

import pytest
import rocksdict

from stream_app.runtime import memory
from stream_app.transport.storage import BudgetedOptions, MemoryBudget


def _open(path, budget: MemoryBudget) -> rocksdict.Rdict:
    options = BudgetedOptions(budget, write_buffer_size=4 << 20, max_write_buffer_number=3, use_rocksdict=True)
    return rocksdict.Rdict(str(path), options=options.as_options())


def test_rocksdb_memory_sums_memtables_and_counts_the_shared_cache_once(tmp_path):
    budget = MemoryBudget.of(64 << 20, 32 << 20)
    dbs = [_open(tmp_path / f"p{n}", budget) for n in range(2)]
    try:
        for db in dbs:
            for i in range(2000):
                db[f"user-{i}".encode()] = b"x" * 200
        one = memory.rocksdb_memory(dbs[:1], budget)
        both = memory.rocksdb_memory(dbs, budget)
        assert set(both) == {"memtables", "table_readers", "block_cache"}
        assert one["memtables"] > 400_000  # 2,000 values of 200 bytes, still in the memtable
        assert both["memtables"] >= 2 * one["memtables"] * 0.9
        assert both["block_cache"] == one["block_cache"]  # one cache, not one per DB
    finally:
        for db in dbs:
            db.close()


def test_partition_dbs_stay_within_one_shared_budget(tmp_path):
    """Four partitions written and read well past the budget: block cache and memtables
    together stay under it (Faust's own options would give each DB its own cache)."""
    budget = MemoryBudget.of(16 << 20, 8 << 20)
    dbs = [_open(tmp_path / f"p{n}", budget) for n in range(4)]
    value = b"v" * 600
    peak = 0
    try:
        for round_ in range(4):
            for i in range(20_000):
                dbs[i % 4][f"{round_}-{i}".encode()] = value
            for i in range(0, 20_000, 2):
                dbs[i % 4].get(f"{round_}-{i}".encode())
            peak = max(peak, budget.cache.get_usage())
        used = memory.rocksdb_memory(dbs, budget)
        assert used["block_cache"] > 0  # reads went through the shared cache
        assert peak <= 17 << 20  # 16 MB budget, plus at most one 1 MB reservation step
    finally:
        for db in dbs:
            db.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="heap breakdown needs glibc")
def test_heap_breakdown_on_glibc():
    before = memory.malloc_heap()
    blocks = [bytearray(50_000) for _ in range(2_000)]  # ~100 MB from malloc
    during = memory.malloc_heap()
    assert during["in_use"] > before["in_use"] + 50 * 2**20
    del blocks
    assert memory.malloc_heap()["in_use"] < during["in_use"] - 50 * 2**20
