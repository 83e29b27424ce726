"""One RocksDB memory budget per worker, shared by every partition DB it owns.

Faust opens one RocksDB per owned table partition and gives each its own block cache and
memtables, so a worker's RocksDB memory grows with the number of partitions it happens to
own (and with Faust's defaults, 2 GB of cache each). Here every DB of the worker draws
from one LRU cache, and their memtables are charged to that same cache through a write
buffer manager: block cache + memtables stay under `state_memory_mb` however partitions
move. Table readers (index and filter blocks) stay outside the budget; they measured
0.1-0.2 MB at soak scale.

Faust picks a store class by URL scheme; `STORE_URL` names this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust.stores
import rocksdict
from faust.stores import rocksdb as faust_rocksdb

STORE_URL = "streamrec-rocksdb://"
faust.stores.STORES.aliases.setdefault("streamrec-rocksdb", f"{__name__}:Store")


@dataclass(frozen=True)
class MemoryBudget:
    """The worker's shared cache and the write buffer manager that charges memtables to it."""

    cache: rocksdict.Cache
    write_buffers: rocksdict.WriteBufferManager
    total_bytes: int

    @classmethod
    def of(cls, total_bytes: int, memtable_bytes: int) -> "MemoryBudget":
        """`memtable_bytes` is when memtables get flushed (the rest of the cache holds
        blocks). No write stall: a stalled put would block the worker's event loop."""
        cache = rocksdict.Cache(total_bytes)
        manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(memtable_bytes, False, cache)
        return cls(cache, manager, total_bytes)

    def usage(self) -> dict[str, int]:
        """Bytes held: the cache's usage includes the memtable reservations, split out here."""
        memtables = self.write_buffers.get_usage()
        return {"block_cache": max(0, self.cache.get_usage() - memtables), "memtables_reserved": memtables}


class BudgetedOptions(faust_rocksdb.RocksDBOptions):
    """Faust's rocksdict options, with the budget's cache and write buffer manager."""

    def __init__(self, budget: MemoryBudget, **options: Any) -> None:
        super().__init__(**options)
        self.budget = budget

    def as_options(self) -> rocksdict.Options:
        """Faust's options, with memtables charged to the budget and a table factory on the
        shared cache (a factory cannot be edited once set, so it is rebuilt like Faust's)."""
        options = super().as_options()
        options.set_write_buffer_manager(self.budget.write_buffers)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(self.budget.cache)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


class Store(faust_rocksdb.Store):
    """Faust's RocksDB store; its DBs open with the budget passed in the table's options."""

    def __init__(self, *args: Any, options: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, options=options, **kwargs)
        settings = {k: v for k, v in self.options.items() if k != "memory_budget"}
        self.rocksdb_options = BudgetedOptions(self.options["memory_budget"], **settings, use_rocksdict=True)
