"""The worker entry point: a configured but unreachable cluster is a bounded one-line
UserError (the CLI prints it), never a hang or a traceback; an empty model directory is
served by the baseline until a checkpoint appears, in a real worker process whose log is
JSON lines (log_format=json)."""
from __future__ import annotations

import time

import pytest

from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.runtime.worker import run_worker


def test_unreachable_cluster_fails_within_the_connect_timeout():
    settings = Settings(bootstrap_servers="127.0.0.1:1", broker_connect_timeout_s=1, allocator="glibc")
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach Kafka at 127.0.0.1:1"):
        run_worker(settings)
    assert time.monotonic() - start < 30


@pytest.mark.integration
def test_an_empty_model_dir_serves_the_baseline_then_the_first_checkpoint(world, make_settings, start_worker,
                                                                          tmp_path):
    """Compose starts the worker on an empty model volume: it must stay up and recommend
    within a minute, then serve the first checkpoint published there (docs/design.md, "A
    model directory may start empty")."""
    import json
    import shutil

    from model import checkpoint
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.harness import TopicReader

    events, _, ckpt = world
    models = tmp_path / "models"
    models.mkdir()
    settings = make_settings(model_dir=models, model_poll_s=0.5, log_format="json")
    start = time.monotonic()
    worker = start_worker(settings)
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)

    def send(batch: list[dict]) -> None:
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
        for e in batch:
            producer.send_event(e)
        producer.close()

    def versions(records) -> set[str]:
        return {json.loads(r.value)["model_version"] for r in records if r.value is not None}

    send(events[:300])
    first = reader.read_until(lambda records: bool(versions(records)), 60)
    assert versions(first) == {"cooccurrence-v1"} and time.monotonic() - start < 60
    log = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in log)  # every line is JSON
    assert sum("waits for a checkpoint" in entry["message"] for entry in log) == 1 and worker.alive()
    assert worker.metrics()['streamrec_model_waiting_seconds{variant="default"}'] > 0  # StreamrecNoModel's gauge
    shutil.copytree(ckpt, tmp_path / "staging-v1")
    (tmp_path / "staging-v1").rename(models / "v1")  # published by a rename, as the learner does
    version = checkpoint.load(str(models / "v1"))[1]["version"]
    deadline = time.monotonic() + 30
    while worker.metrics().get(f'streamrec_model_info{{variant="default",version="{version}"}}') != 1:
        assert time.monotonic() < deadline and worker.alive(), worker.log_tail()
        time.sleep(0.25)
    send(events[300:600])
    later = reader.read_until(lambda records: version in versions(records), 60)
    assert version in versions(later)
    assert worker.metrics().get('streamrec_model_info{variant="default",version="cooccurrence-v1"}') is None
    assert worker.metrics().get('streamrec_model_waiting_seconds{variant="default"}') is None
    reader.close()
