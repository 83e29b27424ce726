"""The item catalog, from the compacted `catalog.items` topic.

Every worker needs the whole catalog (any user may be recommended any item), so it is
read without a consumer group, all partitions, from the beginning; compaction keeps
that read short. An upsert adds the item to each served model's ItemIndex (a new item
gets a content-only vector, recommendable at once) and availability masks scoring.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import torch

from stream_app import metrics

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self) -> None:
        self.meta: dict[str, dict] = {}
        self.unavailable: frozenset[str] = frozenset()
        self._indices: list = []  # ItemIndex objects of served models
        self._blocked: dict[int, tuple[int, frozenset, torch.Tensor]] = {}

    def attach(self, items: Any) -> None:
        """Register a served model's ItemIndex and bring it up to date."""
        self._indices.append(items)
        for item_id, meta in self.meta.items():
            items.add(item_id, meta)

    def detach(self, items: Any) -> None:
        self._indices = [i for i in self._indices if i is not items]

    def apply(self, key: bytes | None, value: bytes | None) -> bool:
        """One catalog record; a tombstone (no value) makes the item unavailable."""
        try:
            item_id = key.decode() if key else None
            record = json.loads(value) if value else None
            if record is not None:
                item_id = str(record.get("item_id") or item_id or "")
            if not item_id or len(item_id) > 128:
                raise ValueError("no item_id")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            log.warning("ignoring malformed catalog record: %s", exc)
            return False
        available = record is not None and record.get("available", True) is not False
        if record is not None:
            meta = {"title": str(record.get("title") or ""), "category": str(record.get("category") or ""),
                    "price": record.get("price")}
            self.meta[item_id] = meta
            for items in self._indices:
                items.add(item_id, meta)
        if available and item_id in self.unavailable:
            self.unavailable = self.unavailable - {item_id}
        elif not available and item_id not in self.unavailable:
            self.unavailable = self.unavailable | {item_id}
        metrics.CATALOG_ITEMS.labels("available").set(len(self.meta) - len(self.unavailable & self.meta.keys()))
        metrics.CATALOG_ITEMS.labels("unavailable").set(len(self.unavailable))
        return True

    def blocked_indices(self, items: Any) -> torch.Tensor:
        """Indices of unavailable items in `items`, cached until either changes."""
        cached = self._blocked.get(id(items))
        if cached is None or cached[0] != len(items) or cached[1] is not self.unavailable:
            idx = [i for i in map(items.lookup, self.unavailable) if i]
            cached = (len(items), self.unavailable, torch.tensor(idx, dtype=torch.long))
            self._blocked[id(items)] = cached
        return cached[2]


async def follow(catalog: Catalog, bootstrap: str, topic: str, options: dict[str, Any] | None = None) -> None:
    """Apply every record of the catalog topic, forever (an app task).

    `options`: security arguments from stream_app.transport.security.aiokafka_options."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100, **(options or {}))
    await consumer.start()
    try:
        async for record in consumer:
            catalog.apply(record.key, record.value)
    finally:
        await consumer.stop()
