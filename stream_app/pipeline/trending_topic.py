"""The trending topic between workers: the snapshot record, and the worker's side of it
(docs/design.md, "Trending is the topic's"; the record is docs/contracts.md, "Trending snapshot").

`parse_snapshot`: a record off the topic, checked before anything is kept. The topic is
compacted and replayed at every start, so a record that crashed the worker would crash it
at every start: a bad one is refused with a reason from REASONS, never raised past `apply`.

`follow`: every worker reads every partition of the topic from the beginning, without a
consumer group (as the catalog is read), and applies each record to its Trending. It also
seeds a partition the worker gains: once it has read to the end offsets the topic had
*after* the gain, the newest snapshot of that partition is the last one its previous owner
published (the previous owner publishes at revocation, before the group hands the partition
on), and the gained partition's counts start from it.

`publish`: each changed, seeded partition's snapshot, keyed `p<partition>`, every
`trending_publish_s` and at revocation; a worker fenced for a stall publishes nothing
(docs/design.md, "Paused workers are fenced"), and a send that fails leaves the partition
to be published again.
"""
from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import orjson

from stream_app import metrics
from stream_app.config import Settings
from stream_app.pipeline.events import TS_MIN
from stream_app.pipeline.failures import Backoff, describe

if TYPE_CHECKING:
    import faust

    from stream_app.pipeline.trending import Trending
    from stream_app.transport.fence import Fence

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_VALUE_BYTES = 1 << 20  # the broker's default record limit; the publisher trims to fit
MAX_SNAPSHOT_ITEMS = 10_000
MAX_ITEM_CHARS = 128  # as for events' item_id
MAX_WEIGHT = 1e12  # far above any partition's event count; bounds sums of many snapshots
SNAPSHOT_FUTURE_S = 3600.0  # a snapshot stamped later than this past our clock is refused
REVOKE_PUBLISH_S = 5.0  # a revocation waits this long at most for its snapshots
_KEY = re.compile(rb"p(0|[1-9][0-9]{0,5})")

# Closed set of reasons a trending-topic record is ignored (metric label values).
REASONS = (
    "bad_key",          # no key, or not p<partition>
    "bad_partition",    # p<n> with n outside the input topic's partitions
    "too_large",        # value over MAX_VALUE_BYTES, or over MAX_SNAPSHOT_ITEMS items; not parsed
    "invalid_json",     # not JSON (or not UTF-8, NaN, Infinity, a number no double holds)
    "not_object",       # JSON, but not an object
    "unknown_version",  # "v" is not a schema version this worker reads
    "bad_time",         # "t" not a number in 2000 .. an hour past this worker's clock
    "wrong_shape",      # "items" not a list of [item_id, weight] with item ids of 1..128 characters
    "bad_weight",       # a weight that is not a finite number in 0 .. MAX_WEIGHT
    "internal",         # anything else raised while applying one record (a bug, not the record)
)
for _r in REASONS:  # export zeros so dashboards and alerts see every series from the start
    metrics.TRENDING_REJECTED.labels(_r)
for _o in ("published", "applied"):
    metrics.TRENDING_SNAPSHOTS.labels(_o)


class Rejected(Exception):
    """A record that breaks the snapshot contract: a reason from REASONS and a detail;
    `partition` is the key's partition when the key itself was valid."""

    def __init__(self, reason: str, detail: str = "", partition: int | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail[:200].encode("utf-8", "backslashreplace").decode()
        self.partition = partition


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One partition's strongest items with their weights at stream time `t`."""

    t: float
    items: tuple[tuple[str, float], ...]


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The record's value (docs/contracts.md, "Trending snapshot"), trimmed to fit the cap."""
    items = list(snapshot.items)
    while True:
        value = orjson.dumps({"v": SCHEMA_VERSION, "t": snapshot.t, "items": items})
        if len(value) <= MAX_VALUE_BYTES or not items:
            return value
        del items[len(items) // 2:]  # long item ids: keep the stronger half


def snapshot_key(partition: int) -> bytes:
    return b"p%d" % partition


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_snapshot(key: Any, value: Any, partitions: int, wall: float) -> tuple[int, Snapshot | None]:
    """Bytes off the trending topic -> (partition, snapshot), None for a tombstone; or
    Rejected(reason). Caps come before parsing, so a huge record costs its length check."""
    if not isinstance(key, (bytes, bytearray, memoryview)) or not len(key):
        raise Rejected("bad_key", "no key: a snapshot is keyed p<partition>")
    if len(key) > 8 or not (m := _KEY.fullmatch(bytes(key))):
        raise Rejected("bad_key", f"key {bytes(key)[:20]!r} is not p<partition>")
    partition = int(m.group(1))
    if partition >= partitions:
        raise Rejected("bad_partition", f"partition {partition} >= {partitions} input partitions")
    if value is None or (isinstance(value, (bytes, bytearray, memoryview)) and not len(value)):
        return partition, None
    try:
        return partition, _snapshot(value, wall)
    except Rejected as exc:
        exc.partition = partition
        raise


def _snapshot(value: Any, wall: float) -> Snapshot:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise Rejected("wrong_shape", f"value is {type(value).__name__}, not bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise Rejected("too_large", f"value of {len(value)} bytes > {MAX_VALUE_BYTES}")
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise Rejected("invalid_json", str(exc)) from None
    if not isinstance(record, dict):
        raise Rejected("not_object", f"top-level JSON is {type(record).__name__}")
    version = record.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise Rejected("unknown_version", f"v={str(version)[:20]}, this worker reads {SCHEMA_VERSION}")
    t = _number(record.get("t"))
    if t is None or not TS_MIN <= t <= wall + SNAPSHOT_FUTURE_S:
        raise Rejected("bad_time", f"t={str(record.get('t'))[:30]} is not a time from 2000 to an hour from now")
    items = record.get("items")
    if not isinstance(items, list):
        raise Rejected("wrong_shape", "items is not a list")
    if len(items) > MAX_SNAPSHOT_ITEMS:
        raise Rejected("too_large", f"{len(items)} items > {MAX_SNAPSHOT_ITEMS}")
    return Snapshot(t, tuple(_entry(e) for e in items))


def _entry(entry: Any) -> tuple[str, float]:
    if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str) \
            or not 0 < len(entry[0]) <= MAX_ITEM_CHARS:
        raise Rejected("wrong_shape", "an item is not [item_id of 1..128 characters, weight]")
    weight = _number(entry[1])
    if weight is None or not 0.0 <= weight <= MAX_WEIGHT:  # orjson already refuses NaN and Infinity
        raise Rejected("bad_weight", f"weight {str(entry[1])[:30]} of {entry[0][:40]!r}")
    return entry[0], weight


Send = Callable[[bytes, bytes], Awaitable[Any]]  # (key, value); raises if the record was not sent
OnReject = Callable[[Any, Any, str], Awaitable[None]]  # (key, value, reason), e.g. a dead letter


async def publish(trending: Trending, send: Send, partitions: Iterable[int] | None = None) -> int:
    """Send the snapshots due (of `partitions` only, if given), one at a time so the event
    loop runs between them; returns how many were sent."""
    due = trending.due(partitions)
    for n, partition in enumerate(due):
        try:
            await send(snapshot_key(partition), trending.take(partition))
        except BaseException as exc:  # cancelled too (a revocation's wait ran out): not sent either
            trending.unsent(due[n:])
            if not isinstance(exc, Exception):
                raise
            log.warning("publishing trending snapshots failed (%s); they go with the next publish", describe(exc))
            return n
        metrics.TRENDING_SNAPSHOTS.labels("published").inc()
    return len(due)


async def follow(trending: Trending, bootstrap: str, topic: str, options: dict[str, Any] | None = None,
                 on_reject: OnReject | None = None, poll_ms: int = 200) -> None:
    """Apply every record of the trending topic, forever (an app task). A failure (the
    broker away, the topic missing) is retried after a backoff, from where it had read.

    `options`: security arguments from stream_app.transport.security.aiokafka_options.
    `on_reject`: awaited for each record ignored (the compacted topic replays it at every
    start, so it sees it again after each restart); its failure is logged, never fatal."""
    backoff, positions = Backoff(), {}
    while True:
        try:
            await _follow(trending, bootstrap, topic, options, positions, backoff, poll_ms, on_reject)
        except (asyncio.CancelledError, MemoryError):
            raise
        except Exception as exc:
            delay = backoff.failed(exc)
            log.warning("reading the trending topic %s failed (%s); again in %.1fs", topic, describe(exc), delay)
            await asyncio.sleep(delay)


async def _follow(trending: Trending, bootstrap: str, topic: str, options: dict[str, Any] | None,
                  positions: dict[int, int], backoff: Backoff, poll_ms: int, on_reject: OnReject | None) -> None:
    from stream_app.transport.readers import whole_topic

    consumer, tps = await whole_topic(bootstrap, topic, options)
    try:
        if not tps:
            raise LookupError(f"topic {topic} has no partitions; create it (streamrec creates it at start)")
        for tp in tps:
            if tp.partition in positions:
                consumer.seek(tp, positions[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        start = await consumer.end_offsets(tps)
        barrier: tuple[int, dict] | None = None  # (gain, the end offsets read after it)
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=poll_ms, max_records=1000)).items():
                for record in records:
                    if not trending.apply(record.key, record.value) and on_reject is not None:
                        await _rejected(trending, on_reject, record)
                if records:
                    positions[tp.partition] = records[-1].offset + 1
            backoff.succeeded()
            if not trending.loaded.is_set() and await _reached(consumer, start):
                trending.loaded.set()
            if trending.seeding:
                if barrier is None or barrier[0] != trending.gains:
                    barrier = (trending.gains, await consumer.end_offsets(tps))
                if await _reached(consumer, barrier[1]):
                    seeded = trending.seed(barrier[0])
                    log.info("trending counts of partitions %s start from their newest snapshots", seeded)
                    barrier = None
            await asyncio.sleep(0)
    finally:
        await consumer.stop()


async def _rejected(trending: Trending, on_reject: OnReject, record: Any) -> None:
    try:
        await on_reject(record.key, record.value, trending.last_reason or "internal")
    except MemoryError:
        raise
    except Exception as exc:
        log.warning("trending on_reject failed: %s", describe(exc))


async def _reached(consumer: Any, ends: dict) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


def install(app: "faust.App", settings: Settings, trending: "Trending", fence: "Fence",
            dead_letter: Callable[..., Awaitable[None]] | None = None) -> None:
    """The worker's side: a timer that publishes, a task that follows, the owned partitions
    at each assignment, and a publish of the revoked ones at each revocation. A record
    ignored goes to `dead_letter(message, reason, detail, source)` (the app's)."""
    from stream_app.pipeline.processor import Message  # imported here: the processor imports Trending

    topic = app.topic(settings.trending_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")

    async def on_reject(key: Any, value: Any, reason: str) -> None:
        await dead_letter(Message(key, value, 0.0), reason, trending.last_detail or reason, b"trending")

    async def send(key: bytes, value: bytes) -> None:
        await (await topic.send(key=key, value=value, force=True))  # delivered, or raises

    async def publish_due(partitions: list[int] | None = None) -> None:
        if not fence.fenced(app.consumer_generation_id):  # another worker may own them by now
            await publish(trending, send, partitions)

    @app.timer(settings.trending_publish_s)
    async def publish_trending() -> None:
        await publish_due()

    @app.task
    async def follow_trending() -> None:
        from stream_app.transport.security import aiokafka_options

        await follow(trending, settings.bootstrap_servers, settings.trending_topic, aiokafka_options(settings),
                     on_reject if dead_letter is not None else None)

    @app.timer(5.0)
    async def trending_gauges() -> None:
        trending.export()

    @app.on_partitions_assigned.connect
    async def assign_trending(app, assigned, **kwargs) -> None:
        trending.assign(tp.partition for tp in assigned if tp.topic == settings.events_topic)

    @app.on_partitions_revoked.connect
    async def publish_revoked_trending(app, revoked, **kwargs) -> None:
        partitions = [tp.partition for tp in revoked if tp.topic == settings.events_topic]
        try:
            await asyncio.wait_for(publish_due(partitions), timeout=REVOKE_PUBLISH_S)
        except asyncio.TimeoutError:
            log.warning("trending snapshots of revoked partitions %s not sent within %ss", partitions,
                        REVOKE_PUBLISH_S)
