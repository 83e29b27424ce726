"""A group-less consumer over a whole topic (stream_app/transport/readers.py), against the
real embedded broker: every partition assigned, every record readable from the start, and
a topic with no partitions yet is an empty assignment, not an error."""
from __future__ import annotations

import asyncio

from stream_app.clients.produce import EventProducer
from stream_app.config import Settings
from stream_app.transport.broker import ensure_topics
from stream_app.transport.readers import whole_topic


def test_whole_topic_reads_every_partition(broker):
    settings = Settings(bootstrap_servers=broker.bootstrap, partitions=3, catalog_topic="readers-test")
    ensure_topics(settings, [settings.catalog_topic])
    producer = EventProducer(broker.bootstrap, settings.catalog_topic)
    for n in range(30):
        producer.send(b"v%d" % n, b"k%d" % n)
    producer.close()

    async def read() -> tuple[list[int], set[bytes], list]:
        consumer, tps = await whole_topic(broker.bootstrap, settings.catalog_topic)
        try:
            await consumer.seek_to_beginning(*tps)
            seen: set[bytes] = set()
            for _ in range(50):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen |= {r.key for r in records}
                if len(seen) == 30:
                    break
        finally:
            await consumer.stop()
        missing, none = await whole_topic(broker.bootstrap, "readers-test-absent")
        await missing.stop()
        return sorted(tp.partition for tp in tps), seen, none

    partitions, keys, absent = asyncio.run(read())
    assert partitions == [0, 1, 2] and keys == {b"k%d" % n for n in range(30)} and absent == []
