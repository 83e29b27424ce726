"""The latest recommendation per user, held by the worker that owns the user's partition.

It answers `GET /recommendations/{user_id}` and measures online quality: a click,
add-to-cart or purchase of an item that was in the user's latest recommendations is a
hit for the variant that produced them.

Each entry is the exact bytes published on the recommendations topic, filed under the
input partition the user's events arrive on: the record went to the same-numbered
partition of the recommendations topic. So after a restart or a rebalance the worker
refills the partitions it gained by reading those recommendations partitions to their end
(`refill`), and drops the ones it lost (docs/design.md, "Lookups survive restarts"). There
is no count bound: it holds one entry per owned user with a list, the users of the owned
shards of the users table, which the TTL bounds; an entry is about 0.5 KB.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict, deque
from typing import Any, Iterable

import orjson

from model.event_types import ENGAGEMENT  # what counts as a hit (never a view or a dismiss)
from stream_app import metrics
from stream_app.pipeline.events import Event
from stream_app.pipeline.failures import Backoff, describe

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of the recommendation record (docs/schemas/recommendation.schema.json)


def encode_record(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


class LatestStore:
    def __init__(self, window: int = 1000) -> None:
        self._values: dict[str, bytes] = {}
        self._partition: dict[str, int] = {}
        self._users: dict[int, set[str]] = defaultdict(set)
        self.owned: set[int] = set()  # input partitions assigned, loaded or loading
        self.loading: set[int] = set()  # assigned, not yet read to their end
        # per partition being refilled: users this worker published for or forgot since the
        # refill began; theirs are newer than anything the refill reads, which skips them
        self._touched: dict[int, set[str]] = {}
        self._recent: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=window))

    def get(self, user_id: str) -> bytes | None:
        """The record last published for the user, as published (None: none held)."""
        return self._values.get(user_id)

    def record(self, user_id: str) -> dict | None:
        value = self._values.get(user_id)
        return None if value is None else orjson.loads(value)

    def put(self, user_id: str, record: dict, partition: int = -1) -> bytes:
        """Keep `record` as the user's latest; returns the bytes to publish."""
        value = encode_record(record)
        self._set(user_id, partition, value)
        self._touch(partition, user_id)
        return value

    def forget(self, user_id: str, partition: int = -1) -> None:
        self._drop(user_id)
        self._touch(partition, user_id)

    def _set(self, user_id: str, partition: int, value: bytes) -> None:
        old = self._partition.get(user_id)
        if old is not None and old != partition:
            self._users[old].discard(user_id)
        self._values[user_id], self._partition[user_id] = value, partition
        self._users[partition].add(user_id)

    def _drop(self, user_id: str) -> None:
        self._values.pop(user_id, None)
        partition = self._partition.pop(user_id, None)
        if partition is not None:
            self._users[partition].discard(user_id)

    def _touch(self, partition: int, user_id: str) -> None:
        touched = self._touched.get(partition)
        if touched is not None:
            touched.add(user_id)

    def assign(self, partitions: Iterable[int]) -> set[int]:
        """The worker owns `partitions` now: drop the entries of those it lost, and return
        the ones to refill (gained, or still loading from an interrupted refill)."""
        partitions = set(partitions)
        for lost in self.owned - partitions:
            for user_id in list(self._users.pop(lost, ())):
                self._values.pop(user_id, None)
                self._partition.pop(user_id, None)
            self._touched.pop(lost, None)
        gained = partitions - self.owned
        for p in gained:
            self._touched[p] = set()
        self.owned = partitions
        self.loading = (self.loading & partitions) | gained
        return set(self.loading)

    def loaded(self, partition: int, entries: dict[str, bytes | None]) -> None:
        """A refill read `partition` to its end: `entries` is each user's newest record
        there (None: a tombstone). Users published for or forgotten meanwhile keep theirs."""
        if partition not in self.loading:
            return  # lost meanwhile
        touched = self._touched.pop(partition, set())
        for user_id, value in entries.items():
            if user_id in touched:
                continue
            if value is None:
                self._drop(user_id)
            else:
                self._set(user_id, partition, value)
        self.loading.discard(partition)

    def score(self, event: Event) -> None:
        """Count an engagement against the recommendations the user had *before* it."""
        if event.type not in ENGAGEMENT or event.user_id not in self._values:
            return
        record = self.record(event.user_id)
        variant = record.get("variant", "default")
        hit = int(any(item.get("item_id") == event.item_id for item in record.get("items", ())))
        metrics.ONLINE_OPPORTUNITIES.labels(variant).inc()
        if hit:
            metrics.ONLINE_HITS.labels(variant).inc()
        recent = self._recent[variant]
        recent.append(hit)
        metrics.ONLINE_HIT_RATE.labels(variant).set(sum(recent) / len(recent))

    def __len__(self) -> int:
        return len(self._values)


async def refill(store: LatestStore, bootstrap: str, topic: str, partitions: set[int],
                 options: dict[str, Any] | None = None) -> None:
    """Read `partitions` of the recommendations topic from the start to the end offsets
    found now, and hand each to `store.loaded` as it completes. Cancelled by the next
    assignment, which restarts it for what is still loading.

    `options`: security arguments from stream_app.transport.security.aiokafka_options."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100, **(options or {}))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
        entries: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
        for p in [p for p in partitions if not ends.get(p)]:
            store.loaded(p, entries.pop(p))
        read = 0
        while entries:
            # no max_records: each fetched batch comes whole, so the records after the end
            # the embedded broker reports (its last batch's base offset + 1, docs/facts.md)
            # arrive with the one at it
            for tp, records in (await consumer.getmany(*[TopicPartition(topic, p) for p in entries],
                                                       timeout_ms=500)).items():
                mine = entries.get(tp.partition)
                if mine is None:
                    continue
                for r in records:
                    if r.key is not None:
                        mine[r.key.decode("utf-8", "replace")] = r.value or None
                read += len(records)
                if records and records[-1].offset + 1 >= ends[tp.partition]:
                    store.loaded(tp.partition, entries.pop(tp.partition))
            await asyncio.sleep(0)
        log.info("latest recommendations of partitions %s read (%d records)", sorted(partitions), read)
    finally:
        await consumer.stop()


class Refills:
    """The store's refill, run in the background after each assignment: /readyz waits for
    it, lookups of its partitions answer 503 meanwhile, and the agent goes on (what it
    publishes meanwhile wins over what the refill reads). A failed read is retried after
    a backoff; a new assignment cancels it and starts what is still loading."""

    def __init__(self, store: LatestStore, bootstrap: str, topic: str, options: dict[str, Any] | None = None) -> None:
        self.store, self.bootstrap, self.topic, self.options = store, bootstrap, topic, options
        self.task: asyncio.Task | None = None

    def assigned(self, partitions: Iterable[int]) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        loading = self.store.assign(partitions)
        if loading:
            self.task = asyncio.ensure_future(self._run(loading))

    async def _run(self, partitions: set[int]) -> None:
        backoff = Backoff()
        while partitions:
            try:
                return await refill(self.store, self.bootstrap, self.topic, partitions, self.options)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.failed(exc)
                log.warning("reading the latest recommendations failed (%s); again in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
                partitions = partitions & self.store.loading
