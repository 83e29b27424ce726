"""Broker trouble while a worker runs. Each test owns its broker, because it freezes or
kills it. Frozen (SIGSTOP: connections stay open, nothing answers — what a network
partition or a stalled broker looks like): the worker says so in metrics and health,
keeps its state, and resumes when the broker does. Gone for good: it exits cleanly,
code 3, one line."""
from __future__ import annotations

import json
import signal
import time

import pytest

from stream_app.transport.broker import EmbeddedBroker
from stream_app.testing.consistency import check
from stream_app.testing.harness import WorkerProcess, metric_sum
from stream_app.testing.harness import isolated_settings
from stream_app.clients.produce import EventProducer
from stream_app.testing.synth import generate
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def health(worker: WorkerProcess) -> dict:
    return json.loads(worker.get("/healthz"))


def produce(settings, events: list[dict]) -> None:
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    for e in events:
        producer.send_event(e)
    producer.close()


def test_frozen_broker_is_reported_and_the_worker_resumes(tmp_path):
    events, _ = generate(users=60, items=200, events=1500, seed=3)
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "frozen", tmp_path, partitions=2, broker_probe_s=0.5,
                                     broker_lost_exit_s=0)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start().wait_ready()
        try:
            produce(settings, events[:700])
            wait_until(lambda: metric_sum(worker.metrics(), "streamrec_events_total") >= 700, 60, "first half")
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: health(worker)["broker"] == "unreachable", 20, "health to report the broker")
                assert worker.metrics()["streamrec_broker_up"] == 0
                time.sleep(8)  # longer than the session timeout's worth of missed heartbeats
                assert worker.alive(), worker.log_tail()
                assert health(worker)["for_s"] >= 8
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: health(worker)["broker"] == "up", 30, "the broker to be seen again")
            produce(settings, events[700:])
            verdict = check(settings, events, timeout=90)
            assert verdict.ok, (verdict, worker.log_tail())
            assert worker.metrics()["streamrec_broker_up"] == 1
        finally:
            worker.stop()


def test_broker_gone_for_good_exits_cleanly_with_code_3(tmp_path):
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "gone", tmp_path, partitions=1, broker_probe_s=0.5,
                                     broker_lost_exit_s=4)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start().wait_ready()
        broker.proc.kill()
        broker.proc.wait(5)
        try:
            code = worker.proc.wait(60)
        finally:
            worker.kill()
    assert code == 3, worker.log_tail()
    said = [line for line in worker.log_path.read_text().splitlines() if "streamrec worker: Kafka" in line]
    assert len(said) == 1 and "unreachable for 4 s" in said[0] and "Restart it when Kafka is back" in said[0], said


def test_embedded_broker_starves_a_fetch_shorter_than_its_partition_listing(tmp_path):
    """The limit the soak's and the demo's producer batching work around (docs/facts.md, Tansu),
    scaled down: Tansu lists every batch of the partition on each fetch and stops at the
    fetch wait, so with a 1 ms wait 6,000 batches are already too many to get the newest
    records, while the worker's 50 ms wait still gets them. If this fails after a Tansu
    upgrade, the listing was fixed: the limit and those workarounds can go."""
    from stream_app.cli import main

    out = tmp_path / "broker.json"
    assert main(["bench", "broker", "--levels", "100,6000", "--waits", "1,50", "--probe-timeout-s", "3",
                 "--json", str(out)]) == 0
    small, large = json.loads(out.read_text())["rows"]
    assert small["newest_1ms"] is not None and small["newest_50ms"] is not None
    assert large["newest_1ms"] is None and large["newest_50ms"] is not None
