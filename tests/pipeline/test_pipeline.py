"""The walking skeleton end to end: real broker, real worker process, real RocksDB."""
from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from stream_app.runtime import allocator
from stream_app.testing.harness import TopicReader, metric_sum
from stream_app.testing.hostile import malformed
from stream_app.clients.produce import EventProducer
from stream_app.testing.synth import generate

pytestmark = pytest.mark.integration


def test_good_and_malformed_stream(make_settings, start_worker):
    """10,000 events + 1,000 malformed: every user served, DLQ exact, metrics agree."""
    settings = make_settings()
    worker = start_worker(settings)
    events, _ = generate(users=300, items=500, events=10_000, seed=11)
    rng = random.Random(5)
    bad = [malformed(rng, n) for n in range(1_000)]
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    slots = sorted(rng.sample(range(len(events) + len(bad)), len(bad)))  # interleave
    good_it, bad_it, slot_set = iter(events), iter(bad), set(slots)
    for i in range(len(events) + len(bad)):
        if i in slot_set:
            payload, _ = next(bad_it)
            producer.send(payload, key=None)
        else:
            producer.send_event(next(good_it))
    producer.close()

    users = {e["user_id"] for e in events}
    recs = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    seen: dict[str, dict] = {}

    def all_served(records):
        for r in records[len(seen_records):]:
            rec = json.loads(r.value)
            seen[rec["user_id"]] = rec
        seen_records[:] = records
        return users <= set(seen)

    seen_records: list = []
    rec_records = recs.read_until(all_served, timeout=90)
    assert users <= set(seen), f"{len(users - set(seen))} users never got a recommendation"
    last_event = {}
    for e in events:
        last_event[e["user_id"]] = e["event_id"]
    sample = seen[events[-1]["user_id"]]
    assert sample["items"] and all(set(i) == {"item_id", "score", "reason"} for i in sample["items"])

    dlq = TopicReader(settings.bootstrap_servers, settings.dlq_topic)
    dead = dlq.read_until(lambda rs: len(rs) >= 1_000, timeout=60)
    dlq.poll(timeout_ms=1000)  # nothing beyond the 1,000
    reasons = Counter(dict(r.headers)["streamrec-reason"].decode() for r in dead)
    assert reasons == Counter(reason for _, reason in bad)
    assert len(dead) == 1_000
    assert Counter(r.value for r in dead) == Counter(payload[:settings.dlq_payload_cap] for payload, _ in bad)

    # the worker survived and its metrics agree with what we counted
    assert worker.alive()
    m = worker.metrics()
    assert metric_sum(m, "streamrec_events_total") == len(events)
    for etype, n in Counter(e["type"] for e in events).items():
        assert m[f'streamrec_events_total{{type="{etype}"}}'] == n
    assert metric_sum(m, "streamrec_invalid_events_total") == 1_000
    for reason, n in reasons.items():
        assert m[f'streamrec_invalid_events_total{{reason="{reason}"}}'] == n
    assert m["streamrec_recommendations_total"] >= len(users)
    assert m["streamrec_recommendations_total"] == len(rec_records) + len(recs.read_until(lambda _: False, 2))
    assert m["streamrec_event_to_recommendation_seconds_count"] == m["streamrec_recommendations_total"]
    assert m["streamrec_inference_batch_size_count"] > 0
    recs.close()
    dlq.close()


def test_redelivered_and_mis_keyed_events(make_settings, start_worker):
    """Same event_id twice counts once; an event keyed wrongly is re-keyed, not lost."""
    settings = make_settings()
    worker = start_worker(settings)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    ev = {"event_id": "dup-1", "user_id": "alice", "type": "view", "item_id": "i1", "ts": 1767225600}
    producer.send_event(ev)
    producer.send_event(ev)
    producer.send(json.dumps({**ev, "event_id": "k-1", "item_id": "i2"}).encode(), key=b"not-alice")
    producer.close()
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    records = reader.read_until(lambda rs: any(json.loads(r.value)["event_id"] == "k-1" for r in rs), 60)
    assert any(json.loads(r.value)["event_id"] == "k-1" for r in records)
    m = worker.metrics()
    assert m['streamrec_events_total{type="view"}'] == 2  # dup-1 once, k-1 once
    assert m["streamrec_duplicate_events_total"] >= 1
    assert m["streamrec_events_rekeyed_total"] == 1
    reader.close()
    # consumer lag per partition: exported every 5 s, 0 once everything is consumed
    deadline = time.monotonic() + 20
    while True:
        lag = {k: v for k, v in worker.metrics().items() if k.startswith("streamrec_consumer_lag{")}
        if lag and all(v == 0 for v in lag.values()):
            break
        assert time.monotonic() < deadline, f"consumer lag not exported / not zero: {lag}"
        time.sleep(0.5)
    assert sorted(lag) == [f'streamrec_consumer_lag{{partition="{p}",topic="{settings.events_topic}"}}'
                           for p in range(settings.partitions)]
    # where the memory goes, read from the live RocksDB shards and the C heap on the same timer
    m = worker.metrics()
    assert m['streamrec_rocksdb_memory_bytes{kind="memtables"}'] > 0  # alice's state was written
    assert {'streamrec_rocksdb_memory_bytes{kind="table_readers"}',
            'streamrec_rocksdb_memory_bytes{kind="block_cache"}'} <= set(m)
    assert m['streamrec_heap_bytes{state="in_use"}'] > 10 * 2**20
    assert m["streamrec_fallback_entries"] == 1  # the pair (i1 -> i2), learnt once despite the redelivery
    running_on = "jemalloc" if allocator.find_jemalloc() else "glibc"  # allocator=auto
    assert m[f'streamrec_allocator_info{{allocator="{running_on}"}}'] == 1
