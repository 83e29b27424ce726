"""Bounded state: users idle longer than the TTL are erased (state, changelog, latest
recommendations), users active again are not. Unit tests of the expiry rule, then a live
worker with a TTL of seconds."""
from __future__ import annotations

import json
import threading
import time

import pytest

from stream_app.testing.consistency import read_changelog
from stream_app.testing.harness import TopicReader, metric_sum
from stream_app.clients.produce import EventProducer
from stream_app.pipeline.state import UserState, expiry_event, idle_state
from tests.pipeline.test_processor import msg, run


def control(event: dict) -> "msg":
    from stream_app.pipeline.processor import Message
    return Message(event["user_id"].encode(), json.dumps(event).encode(), 200.0, 0)


def test_expiry_erases_an_idle_user_and_counts_it():
    _, store = run([msg("a", 1), msg("a", 2), msg("b", 3)])
    state = UserState.from_json(store["a"])
    out, _ = run([control(expiry_event("a", state, 1e9))], store)
    assert out.forgets == {"a": 0} and out.expired == 1 and out.accepted["forget"] == 0


def test_expiry_is_void_if_the_user_was_active_since_the_sweep():
    _, store = run([msg("a", 1)])
    stale = expiry_event("a", UserState.from_json(store["a"]), 1e9)
    _, store = run([msg("a", 2)], store)  # an event lands before the expiry does
    out, store = run([control(stale)], store)
    assert not out.forgets and out.expired == 0 and UserState.from_json(store["a"]).count == 2
    # and within one batch: the event before the expiry wins too
    out, _ = run([msg("a", 3), control(expiry_event("a", UserState.from_json(store["a"]), 1e9))], store)
    assert not out.forgets and "a" in out.writes


def test_idle_state_uses_last_activity():
    states = {u: UserState(count=1, touched=t, partition=1).to_json() for u, t in (("old", 10.0), ("new", 99.0))}
    assert idle_state(states["old"], cutoff=50.0).partition == 1
    assert idle_state(states["new"], cutoff=50.0) is None and idle_state(None, cutoff=50.0) is None
    legacy = {"h": [["i1", 0, 20.0, ""]], "ids": [], "n": 1}  # written before "t" existed: last event time
    assert UserState.from_json(legacy).touched == 20.0


@pytest.mark.integration
def test_idle_users_expire_on_a_live_worker(make_settings, start_worker):
    settings = make_settings(state_ttl_days=3 / 86_400, ttl_sweep_s=1.0)  # 3 seconds
    worker = start_worker(settings)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    idle = [f"idle{n}" for n in range(20)]
    for n, user in enumerate(idle):
        producer.send_event({"event_id": f"e{n}", "user_id": user, "type": "view", "item_id": "i1",
                             "ts": time.time()})
    stop = threading.Event()

    def keep_active() -> None:  # one user never idle for 3 s: an event every 0.3 s
        n = 0
        while not stop.is_set():
            n += 1
            producer.send_event({"event_id": f"a{n}", "user_id": "active", "type": "view", "item_id": "i2",
                                 "ts": time.time()})
            producer.flush()
            time.sleep(0.3)

    active = threading.Thread(target=keep_active)
    active.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric_sum(worker.metrics(), "streamrec_expired_users_total") < 20:
            time.sleep(0.5)
        assert metric_sum(worker.metrics(), "streamrec_expired_users_total") == len(idle)
        table = read_changelog(settings)
        recs = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
        tombstones = {r.key.decode() for r in recs.read_to_end() if r.value is None}
        recs.close()
        # the lookup forgot them too: the fallback answers, not their old list
        assert json.loads(worker.get("/recommendations/idle0"))["source"] == "fallback"
    finally:
        stop.set()
        active.join()
        producer.close()
    assert set(table) == {"active"} and table["active"].count > 5  # idle ones tombstoned, the active one kept
    assert tombstones == set(idle)


def test_rocksdb_memory_is_bounded_by_settings(tmp_path):
    """Faust gives every partition's DB a 2 GB block cache by default; here all of the
    worker's DBs share one budget from settings, memtables charged to it."""
    from stream_app.transport import storage
    from stream_app.pipeline.app import create_app
    from stream_app.pipeline.catalog import Catalog
    from stream_app.config import Settings
    from stream_app.transport.health import BrokerWatch
    from stream_app.serving.lifecycle import Lifecycle

    settings = Settings(bootstrap_servers="127.0.0.1:9", state_dir=tmp_path, state_memory_mb=8,
                        state_write_buffer_mb=4)
    catalog = Catalog()
    app = create_app(settings, Lifecycle(settings, catalog), catalog, BrokerWatch(settings))
    store = app.tables["users"].data
    assert isinstance(store, storage.Store)
    options = store.rocksdb_options
    assert (options.budget.total_bytes, options.budget.write_buffers.get_buffer_size()) == (8 << 20, 4 << 20)
    assert (options.write_buffer_size, options.max_write_buffer_number) == (4 << 20, 3)
    db = store._db_for_partition(0)  # opens a real partition DB with these options
    for i in range(5_000):
        db[f"user-{i}".encode()] = b"x" * 200
    assert options.budget.usage()["memtables_reserved"] > 0  # its memtable is charged to the shared budget
    assert options.budget.cache.get_usage() <= 9 << 20


def test_memtable_larger_than_half_the_budget_is_refused():
    import pydantic
    from stream_app.config import Settings

    with pytest.raises(pydantic.ValidationError, match="STREAMREC_STATE_MEMORY_MB"):
        Settings(state_memory_mb=16, state_write_buffer_mb=16)


def test_a_worker_clock_jump_expires_nobody_early():
    """A worker whose clock is 100 days ahead writes the record's time, not its own, and
    its sweep measures against the newest record time (plus at most an hour)."""
    from stream_app.pipeline.processor import BatchProcessor, Message
    from stream_app.pipeline.state import SWEEP_SLACK_S, StreamClock, sweep_clock
    from stream_app.config import Settings
    from stream_app.serving.recommender import CoOccurrenceRecommender
    jump = 100 * 86_400
    m = msg("a", 1)
    record_time = 1_767_225_600.0
    proc = BatchProcessor(Settings(), CoOccurrenceRecommender(), clock=lambda: record_time + jump)
    out = proc.process([Message(m.key, m.value, record_time, 0, 5)], {}.get)
    assert UserState.from_json(out.writes["a"][1]).touched == record_time
    clock = StreamClock()
    assert sweep_clock(record_time + jump, clock.newest) is None  # nothing processed: no sweep
    clock.saw(record_time, wall=record_time + jump)
    now = sweep_clock(record_time + jump, clock.newest)
    assert now == record_time + SWEEP_SLACK_S
    ttl = 90 * 86_400
    assert idle_state(out.writes["a"][1], cutoff=now - ttl) is None  # idle 1 h, not 100 days
    # a producer stamping records far ahead moves the stream clock at most 5 minutes past the wall
    clock.saw(record_time + 10 * jump, wall=record_time)
    assert clock.newest == record_time + 300
