"""`streamrec learn` against a real broker: a worker hot-swaps what the learner publishes,
grown vocabulary included; a learner killed mid-run leaves only whole checkpoints and
resumes from its committed offsets (docs/design.md, "Published checkpoints are whole")."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.config import ModelConfig
from model.features import ItemIndex
from model.synthetic import drifting_stream
from model.transformer import SeqRec
from stream_app.clients.produce import EventProducer
from stream_app.serving.lifecycle import Lifecycle, newest_checkpoint
from stream_app.testing.harness import TopicReader, WorkerProcess, learner_committed, metric_sum
from stream_app.transport.broker import free_port

ITEMS = 150


def seed_checkpoint(model_dir: Path) -> str:
    """A random-weight starting model: any fine-tune on the stream beats it, so updates publish."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=ITEMS, dim=16, n_layers=1, n_heads=2, window=8, dropout=0.1,
                      content_buckets=2, query_buckets=2, gap_buckets=1)
    return checkpoint.save(str(model_dir / "v1"), SeqRec(cfg, ItemIndex([f"i{n}" for n in range(ITEMS)], cfg)))


def send_stream(settings, events: int, new_items: float = 0.2, seed: int = 3) -> int:
    """A drifting stream whose new items (beyond the checkpoint's) recur, plus one malformed message."""
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    rows = drifting_stream(120, ITEMS, events, drift_at=0.3, new_items=new_items, seed=seed)
    for n, (u, i, ts) in enumerate(rows):
        producer.send_event({"event_id": f"e{n}", "user_id": u, "item_id": i, "type": "click", "ts": ts})
    producer.send(b"{not json", b"x")
    producer.close()
    return len(rows)


def learner_for(settings, log: Path) -> WorkerProcess:
    return WorkerProcess(settings, log, command="learn").start().wait_metrics(60)


def wait_for(check, timeout: float, what: str, proc: WorkerProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.log_tail()}" if proc else ""))


def test_worker_serves_what_the_learner_publishes(make_settings, start_worker, tmp_path):
    models = tmp_path / "models"
    seed_checkpoint(models)
    settings = make_settings(model_dir=models, model_poll_s=0.5, learn_port=free_port(), learn_every_events=800,
                             learn_update_s=5, min_item_events=3, learn_group=f"learn-{tmp_path.name}")
    worker = start_worker(settings)
    learner = learner_for(settings, tmp_path / "learner.log")
    try:
        sent = send_stream(settings, 3000)
        published = wait_for(lambda: [p for p in models.iterdir() if (p / "manifest.json").is_file()], 180,
                             "a published checkpoint", learner)
        m = wait_for(lambda: (lambda m: m if m["streamrec_learner_events_total"] == sent else None)(learner.metrics()),
                     120, "the learner to take in every event", learner)
        assert m['streamrec_learner_skipped_total{reason="invalid_json"}'] == 1.0  # skipped, not fatal
        newest = newest_checkpoint(models)
        manifest = json.loads((newest / "manifest.json").read_text())
        assert manifest["parent"] and manifest["input_offsets"][settings.events_topic]
        assert manifest["holdout"]["candidate_ndcg"] > manifest["holdout"]["serving_ndcg"]
        # every candidate after the drift grew (published or kept aside; the gate may refuse one)
        candidates = [p for root in (models, settings.state_dir / "learner" / "rejected") if root.is_dir()
                      for p in root.iterdir() if (p / "manifest.json").is_file()]
        assert any(checkpoint.load(str(p))[0].items.n_trained > ITEMS for p in candidates), \
            "no new item joined the vocabulary"
        # the worker swaps to it: its recommendations carry the published version
        reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
        versions = {newest.name} | {p.name for p in published}
        try:
            producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
            seen: set[str] = set()

            def served() -> bool:
                producer.send_event({"event_id": f"late-{time.monotonic_ns()}", "user_id": "u1", "item_id": "i2",
                                     "type": "click", "ts": 1.76e9})
                producer.flush()
                seen.update(json.loads(r.value)["model_version"] for r in reader.poll(300) if r.value)
                return bool(seen & versions)
            wait_for(served, 120, f"a recommendation from {versions}", worker)
            producer.close()
        finally:
            reader.close()
        assert metric_sum(worker.metrics(), "streamrec_model_swaps_total") >= 1
    finally:
        learner.stop()


def test_killed_learner_leaves_whole_checkpoints_and_resumes_from_committed_offsets(make_settings, tmp_path):
    models = tmp_path / "models"
    seed_checkpoint(models)
    settings = make_settings(model_dir=models, learn_port=free_port(), learn_every_events=500, learn_update_s=5,
                             min_item_events=3, learn_group=f"learn-{tmp_path.name}")
    total = send_stream(settings, 4000)
    learner = learner_for(settings, tmp_path / "learner.log")
    log = settings.state_dir / "learner" / "updates.jsonl"
    # SIGKILL while a checkpoint is being written if we catch one, else right after an update
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.name.startswith(".tmp-") for p in models.iterdir()) or (log.is_file() and log.read_text().count("\n") >= 2):
            break
        time.sleep(0.002)
    os.kill(learner.proc.pid, signal.SIGKILL)
    learner.proc.wait(10)
    # every directory the worker could pick loads; hidden leftovers are never picked
    for p in models.iterdir():
        if not p.name.startswith("."):
            checkpoint.load(str(p))
    newest = newest_checkpoint(models)
    assert newest is not None and not newest.name.startswith(".")
    # offsets are committed only for finished updates: the last one logged, or the one before
    # it when the kill fell between an update's log line and its commit
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    got = learner_committed(settings)
    finished = [{}] + [{int(p): o for p, o in d["offsets"].items()} for d in done]
    assert got in finished[-2:]
    # a restart takes in exactly the events after the committed offsets
    restarted = learner_for(settings, tmp_path / "learner2.log")
    try:
        expected = total - sum(got.values())  # the malformed message is last: skipped, not an event
        wait_for(lambda: restarted.metrics()["streamrec_learner_events_total"] >= expected, 60,
                 "the restarted learner to catch up", restarted)
        time.sleep(1.0)
        events = restarted.metrics()["streamrec_learner_events_total"]
        skipped = restarted.metrics()['streamrec_learner_skipped_total{reason="invalid_json"}']
        assert events + skipped == total + 1 - sum(got.values())
    finally:
        restarted.stop()


def test_hidden_and_half_written_checkpoints_are_never_served(tmp_path, monkeypatch):
    """A crash mid-publish leaves at most a hidden directory; a failed publish cleans up."""
    models = tmp_path / "models"
    seed_checkpoint(models)
    shutil.copytree(models / "v1", models / ".tmp-crashed")
    (models / ".tmp-crashed" / checkpoint.WEIGHTS).write_bytes(b"half")
    os.utime(models / ".tmp-crashed" / checkpoint.META, (time.time() + 60, time.time() + 60))
    assert newest_checkpoint(models) == models / "v1"
    model, _ = checkpoint.load(str(models / "v1"))

    def boom(*_):
        raise OSError("disk full")
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        checkpoint.publish(str(models), model, {}, {"parent": "v1"})
    assert sorted(p.name for p in models.iterdir()) == [".tmp-crashed", "v1"]
    monkeypatch.undo()
    from stream_app.config import Settings
    life = Lifecycle(Settings(model_dir=models))
    assert life.served["A"] == models / "v1"
    version = checkpoint.publish(str(models), model, {}, {"parent": "v1"})
    assert newest_checkpoint(models) == models / version
    assert json.loads((models / version / "manifest.json").read_text())["parent"] == "v1"


def test_settings_map_onto_the_learner_and_misconfiguration_is_one_line(tmp_path):
    from stream_app.config import Settings
    from stream_app.errors import UserError
    from stream_app.runtime.learner import LearnerProcess, learn_config, run_learner

    cfg = learn_config(Settings(learn_interval_s=7, learn_every_events=9, learn_update_s=3, learn_margin=0.01,
                                min_item_events=4, learn_memory_mb=64))
    assert (cfg.interval_s, cfg.every_events, cfg.update_s, cfg.margin, cfg.min_item_events, cfg.memory_mb) == \
        (7, 9, 3, 0.01, 4, 64)
    seed_checkpoint(tmp_path / "models")
    with pytest.raises(UserError, match="directory of checkpoints"):  # a checkpoint, not a directory of them
        LearnerProcess(Settings(model_dir=tmp_path / "models" / "v1", state_dir=tmp_path / "s"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        LearnerProcess(Settings(model_dir=tmp_path / "empty", state_dir=tmp_path / "s"))
    with pytest.raises(UserError, match="STREAMREC_BOOTSTRAP_SERVERS"):
        run_learner(Settings(model_dir=tmp_path / "models"), __import__("threading").Event())


def test_a_second_learner_on_one_model_directory_stops_at_start_naming_the_first(tmp_path):
    """The lock is held by a real second process; it dies with it (a SIGKILL leaves none)."""
    import subprocess
    import sys

    from stream_app.errors import UserError
    from stream_app.runtime.learner import LOCK, exclusive
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from stream_app.runtime.learner import exclusive; "
                               f"f = exclusive(Path({str(tmp_path / LOCK)!r})); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another learner \\(pid {holder.pid} "):
            exclusive(tmp_path / LOCK)
    finally:
        holder.kill()
        holder.wait(10)
    exclusive(tmp_path / LOCK).close()  # free again once the holder is gone
