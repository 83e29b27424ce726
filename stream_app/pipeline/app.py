"""The Faust app: the data flow of docs/design.md, top to bottom.

  clickstream.events --take_events(B, T)--> BatchProcessor
      bad     --> clickstream.dlq (original bytes, reason headers)
      mis-keyed --> clickstream.events again, keyed by user_id
      good    --> users table (one coalesced write per user per batch, RocksDB + changelog)
              --> recommendations (one record per touched user)
              --> latest store (lookups; refilled from recommendations at each assignment)
  /metrics, /healthz, /readyz and the lookup API: stream_app/pipeline/pages.py.

Topics and table values use the raw codec (a state is encoded once, by state.py, for
both RocksDB and the changelog): Faust's pickle codec is never used (docs/design.md,
"No unsafe deserialisation"), and malformed bytes reach our validation, not Faust's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
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
from stream_app.pipeline import pages, trending_topic
from stream_app.pipeline.latest import Refills
from stream_app.pipeline.pages import owned_partitions
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.pipeline.catalog import Catalog, follow as catalog_follow
from stream_app.pipeline.trending import Trending
from stream_app.pipeline.failures import Backoff, Rewind, describe, is_environment
from stream_app.runtime import failpoints
from stream_app.transport.health import BrokerWatch
from stream_app.serving.lifecycle import Lifecycle
from stream_app.transport.fence import Fence, Fenced
from stream_app.transport.offsets import OffsetGuard
from stream_app.transport.guarded import hold_commits_at_holes, in_order, seek
from stream_app.pipeline.state import StreamClock, UserState, expiry_event, idle_state, sweep_clock
from stream_app.serving.surfaces import OUTPUT, load as load_surfaces
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


REKEYED_FROM = "streamrec-rekeyed-from"
KEY_CAP = 1024  # bytes of a message key kept in its dead letter (a user_id is at most 128 characters)
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
        web_host=advertised_host(settings),
        web_port=settings.web_port,
        table_standby_replicas=0,
        # Tansu reports the high watermark as the last batch's base offset + 1: with
        # one record per batch that is the true end, and table recovery stays consistent
        **({"producer_max_batch_size": 1} if settings.single_record_batches else {}),
        # TLS/SASL for Faust's consumer, producer and topic creation (absent for PLAINTEXT)
        **({"broker_credentials": credentials} if (credentials := faust_credentials(settings)) else {}),
    )


def advertised_host(settings: Settings) -> str:
    """The host other workers forward lookups to. A wildcard bind address is not an
    address: every worker would advertise 0.0.0.0 and a forwarded lookup would reach the
    forwarder itself and answer 404 (docs/design.md, "Lookups are answered by the owner")."""
    if settings.web_advertised_host:
        return settings.web_advertised_host
    if settings.web_host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return settings.web_host


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
    trending = Trending.of(settings, catalog)
    surfaces = load_surfaces(settings.surfaces_file, settings.top_k)
    processor = BatchProcessor(settings, lifecycle.recommender, rules=surfaces[OUTPUT].rules, trending=trending)
    cap = settings.dlq_payload_cap

    guard = OffsetGuard()
    backoff = Backoff()
    stream_clock = StreamClock()
    fence = Fence(settings.broker_session_timeout_s,
                  settle_s=settings.broker_session_timeout_s + settings.broker_rebalance_timeout_s)

    async def dead_letter(msg: Message, reason: str, detail: str, source: bytes = b"events") -> None:
        raw = msg.value or b""
        key = msg.key[:KEY_CAP] if msg.key is not None else None  # a 1 MB key must not fail the DLQ write
        await dlq_topic.send(key=key, value=raw[:cap], headers=[
            ("streamrec-reason", reason.encode()),
            ("streamrec-detail", detail.encode("utf-8", "replace")),
            ("streamrec-truncated", b"1" if len(raw) > cap or key != msg.key else b"0"),
            ("streamrec-source", source),
        ])

    async def catalog_dead_letter(key: bytes | None, value: bytes | None, reason: str) -> None:
        await dead_letter(Message(key, value, 0.0), reason, catalog.last_detail or reason, b"catalog")

    async def send_side_outputs(out, msgs: list[Message], batch: list[faust.EventT]) -> None:
        """Dead letters, re-keyed events and forgets (tombstones in the table and output)."""
        for dead in out.dead:
            await dead_letter(msgs[dead.index], dead.reason, dead.detail)
        for index, user_id in out.rekeyed:  # its original time travels along (a forget after it wins)
            await events_topic.send(key=user_id.encode(), value=msgs[index].value,
                                    headers=[(REKEYED_FROM, repr(msgs[index].timestamp).encode())])
        for user_id, index in out.forgets.items():
            with writing_for(batch[index]):
                # unconditional: a redelivered forget must still send the tombstone
                # that a SIGKILL may have kept from the changelog after the local delete
                del users[user_id]
            await recs_topic.send(key=user_id.encode(), value=None,  # and on the output topic
                                  partition=partition_of(batch[index]))

    async def handle(batch: list[faust.EventT], isolated: bool = False) -> None:
        """One batch: process, write state, send. Raises whatever went wrong; `run` decides."""
        msgs = [msg_of(e) for e in batch]
        if not isolated:
            failpoints.hit("batch")
        out = processor.process(msgs, users.get)
        fence.check(app.consumer_generation_id)  # frozen past the session timeout? write nothing
        with metrics.stage("send"):
            await send_side_outputs(out, msgs, batch)
        fence.check(app.consumer_generation_id)
        with metrics.stage("state_write"):
            for user_id, (index, value) in out.writes.items():
                with writing_for(batch[index]):
                    users[user_id] = value
        with metrics.stage("send"):
            for (user_id, _), (partition, value) in zip(out.recommendations, out.published):
                # buffered like the table's changelog writes; the flush before every
                # commit waits for both (docs/design.md, "Commit after write"); to the
                # partition of the user's events (docs/design.md, "Lookups survive restarts")
                recs_topic.send_soon(key=user_id.encode(), value=value, partition=partition if partition >= 0 else None)

    async def run(batch: list[faust.EventT]) -> None:
        """`handle`, with the failure policy of stream_app/pipeline/failures.py: nothing
        raises out of the agent, because Faust would acknowledge the batch unwritten."""
        try:
            await handle(batch)
        except Exception as exc:
            processor.states.clear()  # cached states may be ahead of the table
            if isinstance(exc, Fenced):
                return await wait_out_fence(batch, exc)
            if is_environment(exc):
                return await retry_later(batch, exc)
            metrics.BATCH_FAILURES.labels("data").inc()
            log.warning("a batch of %d events failed (%s); processing it one event at a time", len(batch),
                        describe(exc))
            for i, event in enumerate(batch):
                try:
                    await handle([event], isolated=True)
                except Exception as exc1:
                    processor.states.clear()
                    if isinstance(exc1, Fenced):
                        return await wait_out_fence(batch[i:], exc1)
                    if is_environment(exc1):
                        return await retry_later(batch[i:], exc1)
                    log.error("event at %s:%s dead-lettered: %s", event.message.partition, event.message.offset,
                              describe(exc1))
                    try:
                        await dead_letter(msg_of(event), "processing_error", describe(exc1))
                    except Exception as exc2:
                        return await retry_later(batch[i:], exc2)
                    metrics.INVALID.labels("processing_error").inc()
        backoff.succeeded()
        stream_clock.saw(max(e.message.timestamp for e in batch), time.time())
        for partition, (_, last) in Rewind.of(offsets_of(batch)).spans.items():
            guard.processed(partition, last)

    async def retry_later(events: list[faust.EventT], exc: BaseException) -> None:
        """Rewind the events' partitions and read them again after a backoff; commits stay
        held before them meanwhile, so a crash loses nothing either."""
        delay = backoff.failed(exc)
        metrics.BATCH_FAILURES.labels("environment").inc()
        log.error("a batch failed for an environmental reason (%s); reading it again in %.1fs", describe(exc), delay)
        spans = Rewind.of(offsets_of(events)).spans
        for partition, (first, last) in spans.items():
            guard.rewind(partition, first, last)
        await asyncio.sleep(delay)
        for partition, (first, _) in spans.items():
            await seek(app, TP(settings.events_topic, partition), first)

    async def wait_out_fence(events: list[faust.EventT], exc: Fenced) -> None:
        """Write nothing until the group has rebalanced (the partitions come back, if they do,
        from their committed offsets) or the fence settles with the member intact (then read
        the events again ourselves)."""
        metrics.FENCED_BATCHES.inc()
        log.warning("not writing a batch of %d events: %s; waiting for the group", len(events), exc)
        generation, spans = app.consumer_generation_id, Rewind.of(offsets_of(events)).spans
        for partition, (first, last) in spans.items():
            guard.rewind(partition, first, last)
        while fence.fenced(app.consumer_generation_id):
            await asyncio.sleep(0.1)
        if app.consumer_generation_id == generation:
            for partition, (first, _) in spans.items():
                await seek(app, TP(settings.events_topic, partition), first)

    @app.timer(0.25)
    async def tick() -> None:
        fence.tick(app.consumer_generation_id)
        for gap in fence.unreported():  # a batch may have noticed it first (Fence.check)
            metrics.STALLS.inc()
            log.warning("the event loop stalled %.1fs, past the session timeout: writing nothing until the group "
                        "settles", gap)

    @app.agent(events_topic)
    async def process(stream: faust.StreamT) -> None:
        hold_commits_at_holes(app, guard)
        if not catalog.loaded.is_set():  # docs/design.md, "Catalog before events"
            log.info("waiting for the catalog to be read to its end before serving events")
            await catalog.loaded.wait()
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
            batch = await in_order(app, guard, batch)
            processor.recommender = lifecycle.recommender  # model swaps land between batches
            processor.states.on_generation(app.consumer_generation_id)  # owned elsewhere meanwhile?
            if batch:
                await run(batch)

    @app.timer(1.0)
    async def reread_holes() -> None:
        if guard.generation != app.consumer_generation_id:
            return  # holes of a past assignment are not ours; the next batch starts afresh
        for partition, offset in guard.overdue():
            log.warning("partition %s: re-read from %s has not started; seeking again", partition, offset)
            await seek(app, TP(settings.events_topic, partition), offset)

    @app.task
    async def follow_catalog() -> None:
        await catalog_follow(catalog, settings.bootstrap_servers, settings.catalog_topic, aiokafka_options(settings),
                             on_reject=catalog_dead_letter)

    @app.timer(settings.ttl_sweep_s)
    async def expire_idle_users() -> None:
        """Bounded state: idle users get an expiry event on their own partition (at most
        10,000 a sweep). The scan yields to the agent every 1,000 users, so a sweep over
        millions of users adds no latency spike."""
        if not settings.state_ttl_days:
            return
        now = sweep_clock(time.time(), stream_clock.newest)
        if now is None:
            return
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

    @app.on_partitions_revoked.connect
    async def drop_revoked_lag(app, revoked, **kwargs) -> None:  # at once, not at the next gauges tick
        metrics.drop_lag((tp.topic, str(tp.partition)) for tp in revoked)

    refills = Refills(processor.latest, settings.bootstrap_servers, settings.recommendations_topic,
                      aiokafka_options(settings))

    @app.on_partitions_assigned.connect
    async def refill_latest(app, assigned, **kwargs) -> None:  # docs/design.md, "Lookups survive restarts"
        refills.assigned(tp.partition for tp in assigned if tp.topic == settings.events_topic)

    def state_of(user_id: str) -> UserState:
        """An owned user's newest state: the processor's write-through cache, else the table."""
        state = processor.states.get(user_id)
        return state if state is not None else UserState.from_json(users.get(user_id))

    trending_topic.install(app, settings, trending, fence, dead_letter)  # docs/design.md, "Trending is the topic's"
    pages.install(app, settings, events_topic, processor.latest, lifecycle, catalog, broker_watch,
                  failing=lambda: backoff.last_error if backoff.failing else None, surfaces=surfaces,
                  state_of=state_of, trending=trending.answer)
    return app


def msg_of(event: faust.EventT) -> Message:
    m = event.message
    return Message(m.key, m.value, m.timestamp, m.partition, m.offset, rekeyed_from(m.headers))


def rekeyed_from(headers) -> float | None:
    """The original record time a re-published mis-keyed event carries (None for any other)."""
    for name, value in (headers.items() if isinstance(headers, dict) else headers or ()):
        if name == REKEYED_FROM:
            try:
                return float(value)
            except (TypeError, ValueError):  # a producer may send any header: ignore a bad one
                return None
    return None


def partition_of(event: faust.EventT) -> int | None:
    partition = event.message.partition
    return partition if partition is not None and partition >= 0 else None


def offsets_of(events: list[faust.EventT]) -> list[tuple[int, int]]:
    return [(e.message.partition, e.message.offset) for e in events]


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
    consumer, lags = app.consumer, {}
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        end, read = consumer.highwater(tp), consumer._read_offset.get(tp)
        if end is not None:
            lags[tp.topic, str(tp.partition)] = max(0, end - (read + 1 if read is not None else 0))
    metrics.export_lag(lags)  # and removes the series of partitions no longer assigned
