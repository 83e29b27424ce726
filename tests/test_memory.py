"""Memory attribution helpers (stream_app/memory.py) against a real RocksDB and the real
C library: the soak and the Grafana memory panels read these numbers."""
from __future__ import annotations

import platform

import pytest
import rocksdict

from stream_app import memory


def test_rocksdb_memory_sums_the_partition_dbs(tmp_path):
    dbs = [rocksdict.Rdict(str(tmp_path / f"p{n}")) for n in range(2)]
    try:
        for db in dbs:
            for i in range(2000):
                db[f"user-{i}"] = "x" * 200
        one = memory.rocksdb_memory(dbs[:1])
        both = memory.rocksdb_memory(dbs)
        assert set(both) == {"memtables", "table_readers", "block_cache"}
        assert one["memtables"] > 400_000  # 2,000 values of 200 bytes, still in the memtable
        assert both["memtables"] >= 2 * one["memtables"] * 0.9
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
