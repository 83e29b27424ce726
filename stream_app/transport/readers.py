"""Consumers without a group that read every partition of a topic: the catalog and the
trending snapshots, which every worker needs whole (its own partitions or not)."""
from __future__ import annotations

from typing import Any


async def whole_topic(bootstrap: str, topic: str, options: dict[str, Any] | None = None):
    """A started consumer assigned to every partition of `topic` (none yet: an empty list),
    and those partitions; the caller seeks and stops it. `options`: security arguments from
    stream_app.transport.security.aiokafka_options."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100, **(options or {}))
    await consumer.start()
    try:
        await consumer.topics()  # metadata, so the topic's partitions are known
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
    except BaseException:
        await consumer.stop()
        raise
    return consumer, tps
