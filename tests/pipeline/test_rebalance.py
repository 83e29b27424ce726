"""Rebalance: two workers in one consumer group. One is SIGKILLed mid-stream; the other
takes over its partitions, recovers their table shards from the changelog and goes on;
the killed one restarts on its old (now stale) local state and gets partitions back.
The end state must equal the offline replay, and every user's newest event is answered."""
from __future__ import annotations

import json
import threading
import time

import pytest

from stream_app.transport.broker import free_port
from stream_app.testing.consistency import check
from stream_app.clients.produce import EventProducer
from stream_app.testing.synth import generate
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def test_kill_one_of_two_workers_and_bring_it_back(make_settings, start_worker, tmp_path):
    events, _ = generate(users=150, items=300, events=6000, seed=9)
    a_settings = make_settings(partitions=4, history_max=500)
    b_settings = a_settings.model_copy(update={"state_dir": tmp_path / "state-b", "web_port": free_port()})
    a = start_worker(a_settings, "a")
    b = start_worker(b_settings, "b")
    wait_until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60, "the two workers to split 4 partitions")

    taken_over = threading.Event()

    def stream():
        """Paced events across the kill; the last third waits for the takeover, so events
        always reach the survivor's new partitions however long the takeover takes."""
        for i, e in enumerate(events):
            if i == 2 * len(events) // 3:
                taken_over.wait(120)
            yield json.dumps(e).encode(), e["user_id"].encode()

    producer = EventProducer(a_settings.bootstrap_servers, a_settings.events_topic)
    feeding = threading.Thread(target=producer.paced, args=(stream(), 300))
    feeding.start()
    time.sleep(3)
    b.kill()
    wait_until(lambda: a.partitions() == [0, 1, 2, 3], 60, "the survivor to take over every partition")
    taken_over.set()
    b = start_worker(b_settings, "b-again")  # same state dir: stale shards, recovered from the changelog
    wait_until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60, "partitions to move back")
    feeding.join()
    producer.close()

    verdict = check(a_settings, events)
    assert verdict.ok, json.dumps(verdict.to_dict(), indent=1)
    assert a.alive() and b.alive()


def test_lag_series_follow_the_assignment():
    """A partition that moved to another worker leaves this worker's /metrics, so
    sum(streamrec_consumer_lag) over workers counts it once (docs/design.md, "Partition
    series follow ownership")."""
    from types import SimpleNamespace

    from faust.types import TP

    from stream_app import metrics
    from stream_app.pipeline.app import export_lag
    from stream_app.testing.harness import parse_metrics

    def lag_series() -> dict[str, float]:
        return {k: v for k, v in parse_metrics(metrics.render().decode()).items()
                if k.startswith("streamrec_consumer_lag{") and 'topic="lag-t"' in k}

    owned = {TP("lag-t", p) for p in range(4)} | {TP("other", 0)}
    consumer = SimpleNamespace(assignment=lambda: owned, highwater=lambda tp: 10, _read_offset={TP("lag-t", 1): 4})
    app = SimpleNamespace(consumer=consumer)
    export_lag(app, "lag-t")
    assert lag_series() == {f'streamrec_consumer_lag{{partition="{p}",topic="lag-t"}}': lag
                            for p, lag in ((0, 10), (1, 5), (2, 10), (3, 10))}
    owned = {TP("lag-t", 1), TP("lag-t", 3)}  # a rebalance gave 0 and 2 to another worker
    export_lag(app, "lag-t")
    assert set(lag_series()) == {f'streamrec_consumer_lag{{partition="{p}",topic="lag-t"}}' for p in (1, 3)}
    metrics.drop_lag([("lag-t", "1")])  # revoked: gone before the next export
    assert set(lag_series()) == {'streamrec_consumer_lag{partition="3",topic="lag-t"}'}
    metrics.export_lag({})
    assert not lag_series()
