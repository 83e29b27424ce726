"""The Faust app: the data flow of docs/design.md, top to bottom.

  clickstream.events --take_events(B, T)--> BatchProcessor
      bad     --> clickstream.dlq (original bytes, reason headers)
      mis-keyed --> clickstream.events again, keyed by user_id
      good    --> users table (one coalesced write per user per batch, RocksDB + changelog)
              --> recommendations (one record per touched user)
  /metrics, /healthz, /readyz on the worker's web server.

Topics and table values use the raw codec (a state is encoded once, by state.py, for
both RocksDB and the changelog): Faust's pickle codec is never used (docs/design.md,
"No unsafe deserialisation"), and malformed bytes reach our validation, not Faust's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref

import faust
from faust.types import TP
from faust.streams import _current_event

from stream_app import metrics
from stream_app.runtime import memory
from stream_app.transport import storage
from stream_app.config import Settings
from stream_app.pipeline.events import encode_event
from stream_app.pipeline.processor import BatchProcessor, Message, encode_record
from stream_app.pipeline.catalog import Catalog, follow as catalog_follow
from stream_app.transport.health import BrokerWatch
from stream_app.serving.lifecycle import Lifecycle
from stream_app.transport.offsets import OffsetGuard
from stream_app.pipeline.state import expiry_event, idle_state
from stream_app.transport.security import aiokafka_options, faust_credentials
from stream_app.transport.faust_app import App

log = logging.getLogger(__name__)

@contextlib.contextmanager
def writing_for(event: faust.EventT):
    """Make `event` the table's current event (it picks the changelog partition from it).

    Only the context variable is set, in this task. Calling stream._set_current_event()
    instead, the documented way, races with take_events()' background buffer filler,
    which reads stream.current_event while our batch awaits: it then buffers a stale event
    in place of the new one, and the new message is silently lost (measured: ~6 in 11,000).
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def faust_settings(settings: Settings) -> dict:
    """Faust/aiokafka knobs; timeouts short because Tansu joins a group only after them."""
    return dict(
        broker=[f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",") if h.strip()],
        store=storage.STORE_URL,
        datadir=str(settings.state_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        key_serializer="json",
        value_serializer="json",
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_max_poll_interval=settings.broker_max_poll_interval_s,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        table_standby_replicas=0,
        # Tansu reports the high watermark as the last batch's base offset + 1: with
        # one record per batch that is the true end, and table recovery stays consistent
        **({"producer_max_batch_size": 1} if settings.single_record_batches else {}),
        # TLS/SASL for Faust's consumer, producer and topic creation (absent for PLAINTEXT)
        **({"broker_credentials": credentials} if (credentials := faust_credentials(settings)) else {}),
    )


def rocksdb_options(settings: Settings) -> dict:
    """Bounded RocksDB memory: every partition DB of the worker shares one budget
    (storage.py), whatever the number of partitions it owns."""
    total = int(settings.state_memory_mb * 2**20)
    budget = storage.MemoryBudget.of(total, memtable_bytes=total // 2)
    return {"memory_budget": budget, "write_buffer_size": int(settings.state_write_buffer_mb * 2**20),
            "max_write_buffer_number": 3}


def create_app(settings: Settings, lifecycle: Lifecycle, catalog: Catalog, broker_watch: BrokerWatch) -> faust.App:
    app = App(settings.app_id, **faust_settings(settings))
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    app.producer_buffer_max = 4 * settings.batch_max
    if settings.single_record_batches:  # only the changelog needs them (transport/faust_app.py)
        app.batched_topics = frozenset({settings.recommendations_topic, settings.dlq_topic})
    events_topic = app.topic(settings.events_topic, **RAW)
    dlq_topic = app.topic(settings.dlq_topic, **RAW)
    recs_topic = app.topic(settings.recommendations_topic, **RAW)
    users = app.Table("users", default=None, partitions=settings.partitions, value_type=bytes,
                      options=rocksdb_options(settings))
    processor = BatchProcessor(settings, lifecycle.recommender)
    cap = settings.dlq_payload_cap

    guard = OffsetGuard()

    async def send_side_outputs(out, msgs: list[Message], batch: list[faust.EventT]) -> None:
        """Dead letters, re-keyed events and forgets (tombstones in the table and output)."""
        for dead in out.dead:
            raw = msgs[dead.index].value or b""
            await dlq_topic.send(key=msgs[dead.index].key, value=raw[:cap], headers=[
                ("streamrec-reason", dead.reason.encode()),
                ("streamrec-detail", dead.detail.encode()),
                ("streamrec-truncated", b"1" if len(raw) > cap else b"0"),
            ])
        for index, user_id in out.rekeyed:
            await events_topic.send(key=user_id.encode(), value=msgs[index].value)
        for user_id, index in out.forgets.items():
            with writing_for(batch[index]):
                # unconditional: a redelivered forget must still send the tombstone
                # that a SIGKILL may have kept from the changelog after the local delete
                del users[user_id]
            await recs_topic.send(key=user_id.encode(), value=None)  # and on the output topic

    @app.agent(events_topic)
    async def process(stream: faust.StreamT) -> None:
        hold_commits_at_holes(app, guard)
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
            batch = await in_order(app, guard, batch)
            msgs = [Message(e.message.key, e.message.value, e.message.timestamp, e.message.partition) for e in batch]
            processor.recommender = lifecycle.recommender  # model swaps land between batches
            processor.states.on_generation(app.consumer_generation_id)  # owned elsewhere meanwhile?
            try:
                out = processor.process(msgs, users.get)
                with metrics.stage("send"):
                    await send_side_outputs(out, msgs, batch)
                with metrics.stage("state_write"):
                    for user_id, (index, value) in out.writes.items():
                        with writing_for(batch[index]):
                            users[user_id] = value
            except BaseException:  # cached states may be ahead of the table: the redelivery
                processor.states.clear()  # must read the table, or it would dedupe unwritten events
                raise
            with metrics.stage("send"):
                for user_id, record in out.recommendations:
                    # buffered like the table's changelog writes; the flush before every
                    # commit waits for both (docs/design.md, "Commit after write")
                    recs_topic.send_soon(key=user_id.encode(), value=encode_record(record))

    @app.timer(1.0)
    async def reread_holes() -> None:
        if guard.generation != app.consumer_generation_id:
            return  # holes of a past assignment are not ours; the next batch starts afresh
        for partition, offset in guard.overdue():
            log.warning("partition %s: re-read from %s has not started; seeking again", partition, offset)
            await seek(app, TP(settings.events_topic, partition), offset)

    @app.task
    async def follow_catalog() -> None:
        await catalog_follow(catalog, settings.bootstrap_servers, settings.catalog_topic, aiokafka_options(settings))

    @app.timer(settings.ttl_sweep_s)
    async def expire_idle_users() -> None:
        """Bounded state: idle users get an expiry event on their own partition (at most
        10,000 a sweep). The scan yields to the agent every 1,000 users, so a sweep over
        millions of users adds no latency spike."""
        if not settings.state_ttl_days:
            return
        now = time.time()
        cutoff, expiring = now - settings.state_ttl_days * 86_400, 0
        for scanned, (user_id, value) in enumerate(users.items(), 1):
            if scanned % 1000 == 0:
                await asyncio.sleep(0)
            state = idle_state(value, cutoff)
            if state is not None and state.partition >= 0:
                await events_topic.send(key=user_id.encode(), partition=state.partition,
                                        value=encode_event(expiry_event(user_id, state, now)))
                expiring += 1
                if expiring >= 10_000:
                    return

    @app.task
    async def watch_broker() -> None:
        await broker_watch.run()

    @app.timer(settings.model_poll_s)
    async def watch_models() -> None:
        await lifecycle.poll()

    @app.timer(5.0)
    async def gauges() -> None:
        metrics.USERS.set(len(users))
        metrics.FALLBACK_ENTRIES.set(lifecycle.fallback.model.entries)
        export_memory(users)
        owned_partitions(app, settings.events_topic)
        export_lag(app, settings.events_topic)

    @app.page("/metrics")
    async def metrics_page(web, request):
        # aiohttp rejects the charset in CONTENT_TYPE_LATEST; Prometheus accepts text/plain
        return web.bytes(metrics.render(), content_type="text/plain")

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json(broker_watch.status())  # 200 even when degraded: a restart cannot fix Kafka

    @app.page("/readyz")
    async def readyz(web, request):
        owned = owned_partitions(app, settings.events_topic)
        ready = not app.rebalancing and bool(owned) and broker_watch.up
        return web.json({"ready": ready, "partitions": owned, "broker": broker_watch.status()["broker"]},
                        status=200 if ready else 503)

    @app.page("/recommendations/{user_id}")
    @app.topic_route(topic=events_topic, match_info="user_id")  # forwarded to the owning worker
    async def lookup(web, request, user_id: str):
        record = processor.latest.get(user_id)
        if record is None:
            return web.json({"error": f"no recommendations for user {user_id!r} yet"}, status=404)
        return web.json(record)

    return app


async def in_order(app: faust.App, guard: OffsetGuard, batch: list[faust.EventT]) -> list[faust.EventT]:
    """The events of `batch` that continue their partition without a hole (see offsets.py);
    for a hole, seek back so the missing messages are read again, in order."""
    if guard.generation != app.consumer_generation_id:
        guard.new_generation(app.consumer_generation_id, committed_offsets(app, batch[0].message.topic))
    kept = []
    for event in batch:
        message = event.message
        ok, seek_to = guard.admit(message.partition, message.offset)
        if seek_to is not None:
            metrics.OFFSET_HOLES.labels(str(message.partition)).inc()
            log.warning("partition %s: offsets %s..%s never reached the agent; reading them again",
                        message.partition, seek_to, message.offset - 1)
            unmark_acked(app, message.tp, seek_to, message.offset)
            await seek(app, message.tp, seek_to)
        if ok:
            kept.append(event)
    return kept


def committed_offsets(app: faust.App, topic: str) -> dict[int, int]:
    """Committed offsets of `topic`'s assigned partitions, as Faust's post-rebalance seek
    found them (Consumer._committed_offset, Faust's own record; partitions never
    committed are absent)."""
    assigned = app.consumer.assignment()
    return {tp.partition: offset for tp, offset in app.consumer._committed_offset.items()
            if tp.topic == topic and tp in assigned and offset}


def hold_commits_at_holes(app: faust.App, guard: OffsetGuard) -> None:
    """Never commit a partition past an open hole. Faust acks messages it skips and the
    ones the guard drops, so its next commit could pass the hole, and a crash before the
    re-read would lose it (`bench chaos` lost 9-11 users that way). Installed once, when
    the agent starts, on Faust's own offset filter (Consumer._filter_committable_offsets,
    a private hook)."""
    consumer = app.consumer
    if getattr(consumer, "_streamrec_holds", False):
        return
    committable = consumer._filter_committable_offsets

    def clamped(tps):
        offsets = committable(tps)
        for tp in list(offsets):
            hole = guard.holes.get(tp.partition)
            if hole is not None and offsets[tp] > hole.start:
                committed = consumer._committed_offset.get(tp)
                if committed is not None and committed >= hole.start:
                    del offsets[tp]
                else:
                    offsets[tp] = hole.start
        return offsets

    consumer._filter_committable_offsets = clamped
    consumer._streamrec_holds = True


def unmark_acked(app: faust.App, tp: TP, start: int, end: int) -> None:
    """Faust's fetch loop records a jump in delivered offsets as a "gap" that counts as
    acked, so it would commit past the hole and a crash before the re-read would lose
    it (seen in `bench chaos`: 11 users). Remove [start, end) from that record: nothing
    past `start` is committed until the re-read acks it. Consumer._gap is Faust's own."""
    gap = getattr(app.consumer, "_gap", {}).get(tp)
    if gap:
        gap.chop(start, end)


async def seek(app: faust.App, tp: TP, offset: int) -> None:
    try:
        await app.consumer.seek(tp, offset)
    except Exception as exc:  # revoked meanwhile: its new owner starts from the committed offset
        log.warning("seek %s to %s failed: %s", tp, offset, exc)


def owned_partitions(app: faust.App, topic: str) -> list[int]:
    """Partitions of `topic` this worker consumes now (and whose table shards it owns)."""
    owned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topic)
    metrics.ASSIGNED_PARTITIONS.set(len(owned))
    return owned


def export_memory(table: faust.Table) -> None:
    """streamrec_rocksdb_memory_bytes{kind} and streamrec_heap_bytes{state}: where RSS goes.

    Faust has no public API for a table's open partition DBs; Store._dbs is its own map."""
    store = table.data
    for kind, size in memory.rocksdb_memory(getattr(store, "_dbs", {}).values(), store.rocksdb_options.budget).items():
        metrics.ROCKSDB_MEMORY.labels(kind).set(size)
    for state, size in (memory.malloc_heap() or {}).items():
        metrics.HEAP.labels(state).set(size)


def export_lag(app: faust.App, topic: str) -> None:
    """streamrec_consumer_lag{topic,partition}: log end offset minus the next offset to read.

    Faust has no public read-position API; _read_offset is the consumer's own bookkeeping."""
    consumer = app.consumer
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        end, read = consumer.highwater(tp), consumer._read_offset.get(tp)
        if end is not None:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - (read + 1 if read is not None else 0)))
