"""The fault matrix's rows on the model side: broken checkpoints at start-up and hot swap,
two learners on one model directory, the learner killed at each step of a publish."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from stream_app.testing.faultkit import Ctx, Row, judged, send, as_messages, wait
from stream_app.testing.harness import WorkerProcess, learner_committed, metric_sum
from stream_app.testing.synth import generate


def bad_checkpoints(ctx: Ctx) -> Row:
    """A corrupt newest checkpoint at start-up, then an oversized and a half-copied one at
    hot swap: the worker serves the last good one throughout, and the half-copied one as
    soon as its copy completes."""
    from stream_app.testing.checkpoints import random_checkpoint
    models = ctx.workdir / "bad_checkpoints-models"
    good = [random_checkpoint(models / f"v{n}", items=300, dim=16, layers=1, window=8) for n in (1, 2)]
    ((models / "v2") / "weights.safetensors").write_bytes(b"\0" * 100)  # truncated
    settings = ctx.settings("bad_checkpoints", model_dir=models, model_poll_s=0.5)
    worker = ctx.worker(settings, "bad_checkpoints")
    row = Row("bad_checkpoints", "corrupt newest at start-up; oversized and half-copied at hot swap")
    try:
        events, _ = generate(users=200, items=300, events=ctx.events // 2, seed=4)
        send(settings, as_messages(events[:100]))
        row.checks["start-up skips the corrupt newest"] = served(worker) == [version_of(models / "v1")]
        big = models / "v3"
        shutil.copytree(models / "v1", big)
        meta = json.loads((big / "checkpoint.json").read_text())
        meta["config"]["dim"] = 2**20
        (big / "checkpoint.json").write_text(json.dumps(meta))
        half = models / "v4"
        random_checkpoint(ctx.workdir / "v4-full", items=300, dim=16, layers=1, window=8)
        half.mkdir()
        shutil.copy(ctx.workdir / "v4-full" / "checkpoint.json", half)  # weights not copied yet
        time.sleep(3)
        send(settings, as_messages(events[100:200]))
        row.checks["hot swap keeps serving v1"] = served(worker) == [version_of(models / "v1")] and worker.alive()
        shutil.copy(ctx.workdir / "v4-full" / "weights.safetensors", half)
        done = time.monotonic()
        row.checks["the completed copy is served"] = wait(lambda: served(worker) == [version_of(half)], 30)
        send(settings, as_messages(events[200:]))
        rejected = metric_sum(worker.metrics(), "streamrec_checkpoint_rejected_total")
        row.checks["each bad checkpoint counted once per state of its files"] = 3 <= rejected <= 4
        judged(row, settings, events, done, worker)
        return row
    finally:
        worker.stop()


def version_of(path: Path) -> str:
    return json.loads((path / "checkpoint.json").read_text()).get("version", path.name)


def served(worker: WorkerProcess) -> list[str]:
    """Versions the worker serves now (streamrec_model_info)."""
    return sorted(k.split('version="')[1].split('"')[0] for k, v in worker.metrics().items()
                  if k.startswith("streamrec_model_info{") and v == 1)


def two_learners(ctx: Ctx) -> Row:
    from stream_app.testing.checkpoints import random_checkpoint
    from stream_app.transport.broker import free_port
    models = ctx.workdir / "two_learners-models"
    random_checkpoint(models / "v1", items=300, dim=16, layers=1, window=8)
    settings = ctx.settings("two_learners", model_dir=models, learn_port=free_port(), learn_group="faults-two_learners")
    first = WorkerProcess(settings, ctx.workdir / "learner-1.log", command="learn").start().wait_metrics(60)
    second = WorkerProcess(settings.model_copy(update={"learn_port": free_port()}), ctx.workdir / "learner-2.log",
                           command="learn").start()
    row = Row("two_learners", "a second learner on the same model directory")
    try:
        second.proc.wait(60)
        row.checks["the second stops at start, naming the first"] = (
            second.proc.returncode != 0 and "another learner" in second.log_tail())
        row.checks["the first keeps running"] = first.alive()
        return row
    finally:
        first.stop()
        second.stop()


PUBLISH_STEPS = ("written", "synced", "renamed", "pruned")


def learner_kills(ctx: Ctx) -> Row:
    """The learner SIGKILLs itself at each step of a publish, one run per step, on the same
    model directory and consumer group; then a clean restart. Every visible directory must
    load, the committed offsets must be a finished update's, and the restart must take in
    exactly the events after them."""
    from model import checkpoint
    from model.synthetic import drifting_stream
    from stream_app.clients.produce import EventProducer
    from stream_app.serving.lifecycle import newest_checkpoint
    from stream_app.testing.checkpoints import random_checkpoint
    from stream_app.transport.broker import free_port
    models = ctx.workdir / "learner_kills-models"
    random_checkpoint(models / "v1", items=300, dim=16, layers=1, window=8, neighbors=0)
    settings = ctx.settings("learner_kills", model_dir=models, learn_port=free_port(), learn_every_events=500,
                            learn_update_s=3, min_item_events=3, learn_keep=2, learn_group="faults-learner_kills")
    rows = drifting_stream(150, 300, max(4000, ctx.events // 2), drift_at=0.3, new_items=0.1, seed=5)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    for n, (u, i, ts) in enumerate(rows):
        producer.send_event({"event_id": f"e{n}", "user_id": u, "item_id": i, "type": "click", "ts": ts})
    producer.close()
    row = Row("learner_kills", f"the learner SIGKILLed at each publish step ({', '.join(PUBLISH_STEPS)})",
              sent=len(rows))
    log = settings.state_dir / "learner" / "updates.jsonl"
    for step in PUBLISH_STEPS:
        learner = WorkerProcess(settings, ctx.workdir / f"learner-{step}.log", {"STREAMREC_FAILPOINTS":
                                f"publish_{step}=kill@1"}, command="learn").start()
        learner.proc.wait(120)
        loads = all(_loads(checkpoint, p) for p in models.iterdir() if not p.name.startswith("."))
        newest = newest_checkpoint(models)
        finished = [{}] + [{int(p): o for p, o in json.loads(line)["offsets"].items()}
                           for line in (log.read_text().splitlines() if log.is_file() else [])]
        row.checks[f"killed after '{step}': dirs load, offsets of a finished update"] = (
            learner.proc.returncode == -9 and loads and newest is not None and not newest.name.startswith(".")
            and learner_committed(settings) in finished[-2:])
    got = learner_committed(settings)
    restarted = WorkerProcess(settings, ctx.workdir / "learner-clean.log", command="learn").start().wait_metrics(60)
    try:
        expected = len(rows) - sum(got.values())
        wait(lambda: restarted.metrics()["streamrec_learner_events_total"] >= expected, 60)
        time.sleep(1)
        took = int(restarted.metrics()["streamrec_learner_events_total"])
        row.lost, row.duplicated = max(0, expected - took), max(0, took - expected)
        row.checks["the restart removed the killed publishes' hidden leftovers"] = not list(models.glob(".tmp-*"))
        row.checks["the clean restart publishes"] = wait(
            lambda: restarted.metrics().get('streamrec_learner_updates_total{outcome="published"}', 0) >= 1, 90)
    finally:
        restarted.stop()
    return row


def _loads(checkpoint, path: Path) -> bool:
    try:
        checkpoint.load(str(path))
        return True
    except Exception:
        return False
