"""Faust, with four changes: a configurable fetch wait, a flush that waits for every
buffered changelog write before a commit, seek-before-resume at takeover, and inline
delivery of fetched messages.

Fetch wait. Faust hard-codes fetch_max_wait_ms=1500. Kafka answers a fetch as soon as
data arrives, so that is harmless there, but Tansu (the embedded broker) answers only
when the wait expires: measured p50 event latency 386 ms at 1500 ms, 32 ms at 100 ms,
12 ms at 20 ms.

Flush before commit. Faust flushes its producer before it commits offsets, but the
flush of its own send buffer (table changelog writes wait there) returns as soon as no
message was sent for 0.1 s, e.g. while the first send after a restart waits for
metadata. Faust then commits offsets whose changelog writes are still in the buffer,
and a SIGKILL loses them for good. Measured: a commit with 15 of 17 buffered writes
unsent; `bench chaos` lost 55 users in 10 kills once redeliveries rewrote state.
`_Producer.flush` first waits for the newest buffered message to be delivered.

Seek before resume. After a rebalance, faust-streaming 0.15.3's Recovery (both
`_resume_streams` and `on_recovery_completed`) resumes the stream partitions *before*
it seeks them to their committed offsets. The fetch loop is running then (it is reading
changelogs), so a batch fetched from the old position can land after the seek: Faust
records its offsets as read, skips everything the seek re-reads below them and counts
the jump as acked. Measured: holes of 1-10 offsets per partition at a takeover, events
appended out of order at the next rebalance or lost. `_Recovery` defers those resumes
until the seek is done; `stream_app/transport/offsets.py` still checks every offset.

Inline delivery. Faust's fetch loop hands each message to its stream through
`wait_first(callback(message), suspend_flow.wait())`: four tasks and an `asyncio.wait`
per message, so that a rebalance (which suspends the flow) can abandon a delivery that
waits for buffer space. Measured, that machinery was the largest share of a worker's
CPU (docs/operations.md, "Where a worker's time goes"). `_Consumer` runs the callback
inline instead; only a delivery that would wait is handed to Faust's race, so the
rebalance behaviour is Faust's own.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Coroutine, Generator, Iterator

import faust
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.web import drivers as web_drivers


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # read by the Fetcher at start()
        return consumer


class _Resume:
    """Awaitable that continues a coroutine already stepped once by `deliver_inline`."""

    def __init__(self, coro: Coroutine, waiting_on: Any) -> None:
        self.coro, self.waiting_on = coro, waiting_on

    def __await__(self) -> Generator[Any, None, Any]:
        signal = self.waiting_on
        while True:
            try:
                yield signal
            except BaseException as exc:  # a cancel (the flow was suspended) reaches the callback
                step: Callable[[], Any] = lambda exc=exc: self.coro.throw(exc)
            else:
                step = lambda: self.coro.send(None)
            try:
                signal = step()
            except StopIteration as stop:
                return stop.value


async def deliver_inline(coro: Coroutine, race: Callable[[Awaitable], Awaitable]) -> None:
    """Run `coro` in the caller's task; if it would wait, finish it under `race`."""
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return
    await race(_Resume(coro, waiting_on))


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - the live worker runs it
        """faust 0.15.3's Consumer._drain_messages with the delivery made inline (see above);
        offsets, gaps and commit_every are kept as Faust keeps them."""
        callback, getmany = self.callback, self.getmany
        consumer_should_stop, fetcher_should_stop = self._stopped.is_set, fetcher._stopped.is_set
        get_read_offset, set_read_offset = self._read_offset.__getitem__, self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        suspend_flow = self.suspend_flow

        def race(delivery: Awaitable) -> Awaitable:
            return self.wait_first(delivery, suspend_flow.wait())

        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > 100:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset, r_offset = message.offset, get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # Faust drops these too (read again after a seek)
                        if offset - (r_offset or 0) > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if suspend_flow.is_set():
                            await race(callback(message))
                        else:
                            await deliver_inline(callback(message), race)
                        set_read_offset(tp, offset)
                    self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)


class _Producer(faust_aiokafka.Producer):
    """Faust's producer, plus: a flush that waits for the newest buffered message, and
    a second aiokafka producer with ordinary batching for `app.batched_topics`.

    Why the second producer: on Tansu every record is sent as its own batch (the table
    changelog needs it, docs/facts.md) and aiokafka has one produce request in flight per
    broker, carrying at most one batch per partition, so output records queued behind
    the changelog's. Outputs have no such need; batched, they leave the changelog path
    alone (docs/operations.md, "Where a worker's time goes")."""

    _newest: asyncio.Future | None = None  # the last message put in the send buffer
    _batched: Any = None  # aiokafka producer for app.batched_topics, when there are any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust's fetch loop stops to drain this buffer past 100 messages; a batch puts up
        # to two per user (changelog write and recommendation), so size it to the batch
        self.buffer.max_messages = self.app.producer_buffer_max

    async def on_start(self) -> None:
        await super().on_start()
        if self.app.batched_topics:
            self._batched = self._producer_type(**{**self._settings_default(), **self._settings_auth(),
                                                   **self._settings_extra(), "max_batch_size": 65_536,
                                                   "linger_ms": 0})
            await self._batched.start()

    async def on_stop(self) -> None:
        batched, self._batched = self._batched, None
        if batched is not None:
            await batched.stop()
        await super().on_stop()

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: float | None, headers: Any, *, transactional_id: str | None = None) -> Any:
        if self._batched is None or topic not in self.app.batched_topics:
            return await super().send(topic, key, value, partition, timestamp, headers,
                                      transactional_id=transactional_id)
        try:
            return await self._batched.send(topic, value, key=key, partition=partition, headers=headers,
                                            timestamp_ms=int(timestamp * 1000.0) if timestamp else None)
        except faust_aiokafka.KafkaError as exc:
            raise faust_aiokafka.ProducerSendError(f"Error while sending: {exc!r}") from exc

    def send_soon(self, fut) -> None:
        self._newest = fut
        super().send_soon(fut)

    async def flush(self) -> None:
        """The buffer sends in order, so once its newest message is delivered all that
        were buffered before it are at least handed to aiokafka, whose flushes follow.
        A failed send raises here, and the commit that asked for the flush does not
        happen: the events are redelivered."""
        if self._newest is not None:
            await asyncio.shield(self._newest)
        await super().flush()
        if self._batched is not None:
            await self._batched.flush()


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer


_DEFERRED = ("resume_partitions", "perform_seek")


@contextlib.contextmanager
def seek_before_resume(consumer: Any) -> Iterator[None]:
    """While open, `consumer.resume_partitions` only remembers its partitions, and
    `consumer.perform_seek` resumes them once the seek has finished. Whatever is still
    remembered on exit (no seek was asked for) is resumed then. Nested, the inner context
    hands its resumes to the outer one, which still holds them until its own seek."""
    pending: set = set()
    resume, perform_seek = consumer.resume_partitions, consumer.perform_seek
    own = {name: vars(consumer)[name] for name in _DEFERRED if name in vars(consumer)}  # an outer context's

    async def seek_then_resume() -> None:
        await perform_seek()
        if pending:
            resume(set(pending))
            pending.clear()

    consumer.resume_partitions = pending.update
    consumer.perform_seek = seek_then_resume
    try:
        yield
    finally:
        for name in _DEFERRED:  # back to what was there: an outer context's, or the class's methods
            if name in own:
                setattr(consumer, name, own[name])
            else:
                delattr(consumer, name)
        if pending:
            resume(set(pending))


class _Recovery(Recovery):
    async def _resume_streams(self, generation_id: int = 0) -> None:
        with seek_before_resume(self.app.consumer):
            await super()._resume_streams(generation_id)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        with seek_before_resume(self.app.consumer):
            await super().on_recovery_completed(generation_id)


class _TableManager(TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = _Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class App(faust.App):
    """faust.App whose consumer uses `fetch_max_wait_ms`, whose producer buffers up to
    `producer_buffer_max` messages (both set before the worker starts) and whose table
    recovery seeks stream partitions before resuming them."""

    fetch_max_wait_ms: int = 1500
    producer_buffer_max: int = 100  # Faust's ProducerBuffer.max_messages
    batched_topics: frozenset[str] = frozenset()  # sent with ordinary batching (see _Producer)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, TableManager=_TableManager, **kwargs)

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)

    def _new_web(self):
        return _only_our_pages(web_drivers.by_url(self.conf.web))(self)


def _only_our_pages(web_class: type) -> type:
    """Faust's web server without its built-in pages. `/table/<name>/<key>/` answers a
    table lookup (users' raw histories here), `/router/` lists the cluster, `/graph/`,
    `/stats/` and `/` describe the worker: none are documented or authenticated, so the
    worker serves only the pages docs/security.md lists (docs/design.md, "Only documented
    pages")."""
    return type("StreamrecWeb", (web_class,), {"default_blueprints": [], "production_blueprints": [],
                                                "debug_blueprints": [], "optional_blueprints": []})
