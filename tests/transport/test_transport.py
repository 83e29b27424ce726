"""seek_before_resume (stream_app/transport/faust_app.py): the order fix for Faust's Recovery, as
pure logic on a recording consumer. The live proof is the rebalance and chaos runs."""
from __future__ import annotations

import asyncio

from stream_app.transport.faust_app import App, _Recovery, seek_before_resume


class RecordingConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def resume_partitions(self, tps) -> None:
        self.calls.append(("resume", frozenset(tps)))

    async def perform_seek(self) -> None:
        self.calls.append(("seek",))


async def faust_recovery_order(consumer) -> None:
    """What Faust 0.15.3's Recovery does at the end of a rebalance."""
    consumer.resume_partitions({"events-0", "events-1"})
    await consumer.perform_seek()


def test_resume_waits_for_the_seek():
    consumer = RecordingConsumer()
    with seek_before_resume(consumer):
        asyncio.run(faust_recovery_order(consumer))
    assert consumer.calls == [("seek",), ("resume", frozenset({"events-0", "events-1"}))]


def test_methods_are_restored_and_an_unsought_resume_still_happens():
    consumer = RecordingConsumer()
    with seek_before_resume(consumer):
        consumer.resume_partitions({"events-2"})
        assert consumer.calls == []
    assert consumer.calls == [("resume", frozenset({"events-2"}))]
    consumer.resume_partitions({"events-3"})  # the class's method again, not the recorder
    assert consumer.calls[-1] == ("resume", frozenset({"events-3"}))
    assert "resume_partitions" not in vars(consumer) and "perform_seek" not in vars(consumer)


def test_nested_contexts_hold_resumes_until_the_outer_seek_and_restore_in_order():
    consumer = RecordingConsumer()
    with seek_before_resume(consumer):
        outer_resume = consumer.resume_partitions
        with seek_before_resume(consumer):
            consumer.resume_partitions({"events-0"})
            asyncio.run(consumer.perform_seek())  # the inner seek: the real one runs, nothing resumed yet
        assert consumer.resume_partitions == outer_resume  # the outer context's deferral is back
        assert consumer.calls == [("seek",)]
        asyncio.run(consumer.perform_seek())
    assert consumer.calls == [("seek",), ("seek",), ("resume", frozenset({"events-0"}))]
    assert "resume_partitions" not in vars(consumer) and "perform_seek" not in vars(consumer)


def test_the_app_recovers_with_the_fixed_order():
    app = App("transport-test", broker="kafka://localhost:1", store="memory://")
    assert isinstance(app.tables.recovery, _Recovery)


def test_flush_waits_for_the_newest_buffered_write_and_raises_if_it_failed():
    """Faust's own buffer flush gives up after 0.1 s without a send, and the commit
    that follows can pass changelog writes still in the buffer."""
    async def scenario(fail: bool) -> bool:
        app = App("flush-test", broker="kafka://localhost:1", store="memory://")
        producer = app.producer
        sent = asyncio.get_running_loop().create_future()  # stands in for a FutureMessage
        producer.send_soon(sent)
        flushing = asyncio.ensure_future(producer.flush())
        await asyncio.sleep(0.3)
        waited = not flushing.done()
        producer.buffer.pending.get_nowait()  # what the buffer's sender task does
        sent.set_exception(RuntimeError("broker said no")) if fail else sent.set_result(None)
        try:
            await flushing
        except RuntimeError:
            assert fail
        else:
            assert not fail
        return waited

    assert asyncio.run(scenario(fail=False))
    assert asyncio.run(scenario(fail=True))


# --- inline delivery ----------------------------------------------------------------

def test_a_delivery_that_does_not_wait_runs_inline_without_the_race():
    from stream_app.transport.faust_app import deliver_inline
    delivered, raced = [], []

    async def callback(n):
        delivered.append(n)

    async def race(awaitable):
        raced.append(awaitable)
        await awaitable

    async def main():
        for n in range(3):
            await deliver_inline(callback(n), race)

    asyncio.run(main())
    assert delivered == [0, 1, 2] and raced == []


def test_a_delivery_that_waits_finishes_under_the_race_with_its_result():
    from stream_app.transport.faust_app import deliver_inline
    steps = []

    async def callback():
        steps.append("start")
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a real future
        steps.append("end")

    async def race(awaitable):
        steps.append("raced")
        await asyncio.ensure_future(awaitable)  # as mode's wait_first does: in a task of its own

    asyncio.run(deliver_inline(callback(), race))
    assert steps == ["start", "raced", "end"]


def test_a_suspended_flow_cancels_a_waiting_delivery_inside_the_callback():
    """Faust's race cancels the delivery when the flow is suspended; the cancel must reach
    the callback (its cleanup runs) and not be swallowed."""
    from stream_app.transport.faust_app import deliver_inline
    cleaned = []

    async def callback(never: asyncio.Event):
        try:
            await never.wait()
        finally:
            cleaned.append(True)

    async def race(awaitable):
        task = asyncio.ensure_future(awaitable)
        await asyncio.sleep(0.01)
        task.cancel()
        done, _ = await asyncio.wait([task])
        return task.cancelled()

    async def main():
        return await deliver_inline(callback(asyncio.Event()), race)

    asyncio.run(main())
    assert cleaned == [True]
