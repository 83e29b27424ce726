"""`streamrec learn`: the continual learner as a process of its own.

It reads the events topic in its own consumer group with the worker's event contract
(a bad message is skipped and counted, never fatal), feeds model/continual.py's `Learner`,
publishes each candidate that passes the gate into the worker's model directory (the
worker hot-swaps it) and keeps the others aside. Offsets are committed only when an
update has finished, and a checkpoint becomes visible only by a rename: a learner killed
mid-update publishes nothing partial and resumes from the last finished update's offsets
(docs/design.md, "Published checkpoints are whole").
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path

from model import checkpoint
from model.features import RawEvent
from stream_app import metrics
from stream_app.config import Settings, add_settings_arguments, settings_from_args
from stream_app.errors import UserError
from stream_app.pipeline.events import InvalidEvent, decode_event
from stream_app.runtime import failpoints
from stream_app.serving.lifecycle import checkpoints, fingerprint, newest_checkpoint

log = logging.getLogger("streamrec.learn")

EXAMPLES = """examples:
  STREAMREC_BOOTSTRAP_SERVERS=kafka:9092 streamrec learn --model-dir models/
  streamrec learn --bootstrap-servers 127.0.0.1:9092 --model-dir models/ --learn-interval-s 60 --learn-port 6068
"""
REJECTED_KEEP = 3
LOCK = ".learner.lock"  # hidden: never taken for a checkpoint


def exclusive(path) -> object:
    """Hold an exclusive lock on `path` for the process's lifetime. Two learners on one
    model directory would each publish versions the other overwrites and prunes (docs/design.md,
    "One learner per model directory"); the second one stops at start, naming the first. The
    lock is flock(2): it dies with its process, so a SIGKILLed learner never leaves it stale."""
    import fcntl
    import os

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"another learner ({holder}) already publishes into {path.parent}; run one learner per "
                        "model directory, or stop that one first") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def learn_config(settings: Settings):
    """The learner's algorithm settings; everything else keeps model/config.py's defaults."""
    from dataclasses import replace

    from model.config import LearnConfig
    return replace(LearnConfig(), interval_s=settings.learn_interval_s, every_events=settings.learn_every_events,
                   update_s=settings.learn_update_s, memory_mb=settings.learn_memory_mb, margin=settings.learn_margin,
                   min_item_events=settings.min_item_events)


class LearnerProcess:
    """The Learner between a Kafka consumer and the model directory."""

    def __init__(self, settings: Settings) -> None:
        import torch

        from model.cache import pick_device
        from model.continual import Learner
        root = settings.model_dir
        if root is None or (root / checkpoint.META).is_file():
            raise UserError("streamrec learn publishes into a directory of checkpoints: set STREAMREC_MODEL_DIR to "
                            "the worker's model directory, with the first checkpoint in a subdirectory (e.g. "
                            f"{root or 'models'}/v1)")
        if newest_checkpoint(root) is None:
            raise UserError(f"no checkpoint in {root}; train one first: streamrec train --out {root}/v1 --data ...")
        self.lock = exclusive(root / LOCK)
        for leftover in root.glob(".tmp-*"):  # a publish killed before its rename; ours alone, we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        self.rejected: dict[Path, tuple] = {}  # broken checkpoint -> its files' fingerprint: retried if they change
        torch.set_num_threads(settings.learn_threads)
        self.settings, self.root, self.device = settings, root, pick_device(settings.learn_device)
        self.log_dir = settings.state_dir / "learner"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        loaded = self._newest_loadable()
        if loaded is None:
            raise UserError(f"no loadable checkpoint in {root} (see the lines above); train one: "
                            f"streamrec train --out {root}/v1 --data ...")
        model, meta, self.serving_dir = loaded
        self.version = meta["version"]
        self.learner = Learner(model, learn_config(settings), settings.seen_policy, publish=self._publish)
        self.offsets: dict[int, int] = {}  # partition -> next offset, of events taken in

    # ---- input ------------------------------------------------------------------------
    def take(self, partition: int, offset: int, value: bytes | None) -> None:
        """One input record: an event for the learner, a forget, or a skipped message."""
        self.offsets[partition] = offset + 1
        try:
            ev = decode_event(value, self.settings.max_event_bytes)
        except InvalidEvent as exc:
            metrics.LEARNER_SKIPPED.labels(exc.reason).inc()
            return
        if ev.type == "forget":
            self.learner.forget(ev.user_id)
            return
        metrics.LEARNER_EVENTS.inc()
        self.learner.observe(ev.user_id, RawEvent(ev.item_id, ev.type, ev.ts, ev.query), time.time())

    # ---- updates ----------------------------------------------------------------------
    def _newest_loadable(self, stop_at: Path | None = None):
        """(model, meta, dir) of the newest checkpoint that loads, skipping broken ones as the
        worker does; None if none newer than `stop_at` does."""
        for ckpt in checkpoints(self.root):
            if ckpt == stop_at:
                return None
            fp = fingerprint(ckpt)
            if self.rejected.get(ckpt) == fp:
                continue
            try:
                model, meta = checkpoint.load(str(ckpt), self.device)
            except checkpoint.BadCheckpoint as exc:
                log.error("not learning from %s: %s", ckpt, exc)
                self.rejected[ckpt] = fp
                continue
            return model, meta, ckpt
        return None

    def adopt_newer(self) -> None:
        """A checkpoint someone else put in the model directory (a full retrain) becomes the
        base; a broken one is skipped, never fatal."""
        loaded = self._newest_loadable(stop_at=self.serving_dir)
        if loaded is not None:
            model, meta, self.serving_dir = loaded
            self.learner.serve(model)
            self.version = meta["version"]
            log.info("adopted %s, published by someone else, as the base of the next updates", self.version)

    def update(self) -> dict:
        """One update; returns its report (also appended to updates.jsonl). No record is taken
        in during it, so `self.offsets` are the offsets it covers."""
        self.adopt_newer()
        parent, offsets = self.version, dict(self.offsets)
        report = self.learner.update(time.time())
        report.update(parent=parent, offsets=offsets, at=time.time())
        metrics.LEARNER_UPDATES.labels("published" if report["published"] else report["reason"]).inc()
        metrics.LEARNER_UPDATE_SECONDS.observe(report["seconds"])
        if not report["published"]:
            aside = checkpoint.publish(str(self.log_dir / "rejected"), self.learner.candidate,
                                       {"rejected": report["reason"]}, self._manifest(report), keep=REJECTED_KEEP)
            report["kept_aside"] = aside
        with open(self.log_dir / "updates.jsonl", "a") as f:
            f.write(json.dumps(report) + "\n")
        gate = report["gate"]
        log.info("update %d: %d events, %d sequences + %d replay, %d new items, %d steps in %.1fs; holdout "
                 "NDCG@10 %.4f vs serving %.4f: %s", report["update"], report["events"], report["train_sequences"],
                 report["replay_sequences"], report["new_items"], report["steps"], report["seconds"],
                 gate.get("candidate_ndcg", 0.0), gate.get("serving_ndcg", 0.0),
                 f"published {report['version']}" if report["published"] else f"kept aside ({report['reason']})")
        return report

    def _manifest(self, report: dict) -> dict:
        m = self.learner.metrics
        return {"parent": self.version, "input_offsets": {self.settings.events_topic: dict(self.offsets)},
                "prequential": {name: {"hr": r.hr(), "ndcg": r.ndcg()} for name, r in m.items()},
                "holdout": report["gate"], "update": {k: report[k] for k in ("update", "events", "new_items",
                                                                             "steps", "seconds")},
                "published_at": time.time()}

    def _publish(self, model, report: dict) -> str:
        version = checkpoint.publish(str(self.root), model, {"continual": True}, self._manifest(report),
                                     keep=self.settings.learn_keep, step=lambda name: failpoints.hit(f"publish_{name}"))
        self.serving_dir, self.version = self.root / version, version
        metrics.LEARNER_LAST_PUBLISH.set(time.time())
        return version

    def export(self) -> None:
        lr = self.learner
        for name, r in lr.metrics.items():
            metrics.PREQUENTIAL_HR.labels(name).set(r.hr())
            metrics.PREQUENTIAL_NDCG.labels(name).set(r.ndcg())
        for name, r in lr.new_item_metrics.items():
            metrics.PREQUENTIAL_NEW_ITEM_HR.labels(name).set(r.hr())
        metrics.LEARNER_VOCABULARY.set(lr.serving.cfg.n_items)
        metrics.LEARNER_KEPT.labels("recent").set(lr.kept)
        metrics.LEARNER_KEPT.labels("replay").set(sum(len(s) for _, s in lr.replay))


def run_learner(settings: Settings, stop: threading.Event) -> int:
    """Consume, learn and publish until `stop` is set."""
    from kafka import KafkaConsumer, TopicPartition
    from prometheus_client import start_http_server

    from stream_app.transport.broker import wait_for_broker
    from stream_app.transport.security import kafka_python_options

    if settings.embedded:
        raise UserError("streamrec learn reads the worker's events topic: set STREAMREC_BOOTSTRAP_SERVERS to the "
                        "broker the worker uses")
    options = kafka_python_options(settings)
    wait_for_broker(settings.bootstrap_servers, settings.broker_connect_timeout_s, options,
                    "STREAMREC_BOOTSTRAP_SERVERS")
    proc = LearnerProcess(settings)
    start_http_server(settings.learn_port, addr=settings.web_host, registry=metrics.LEARNER_REGISTRY)
    # every partition, assigned (no group join: one learner learns from all users); the group
    # only holds its committed offsets
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.learn_group,
                             enable_auto_commit=False, auto_offset_reset="earliest", **options)
    parts = consumer.partitions_for_topic(settings.events_topic)
    if not parts:
        raise UserError(f"topic {settings.events_topic} does not exist; start the worker first (it creates it)")
    tps = {p: TopicPartition(settings.events_topic, p) for p in sorted(parts)}
    consumer.assign(list(tps.values()))
    print(f"streamrec learn: kafka {settings.bootstrap_servers}, serving {proc.version}, device {proc.device}, "
          f"threads {settings.learn_threads}, metrics http://{settings.web_host}:{settings.learn_port}/metrics",
          flush=True)
    try:
        while not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=500, max_records=500).items():
                for r in records:
                    proc.take(tp.partition, r.offset, r.value)
                    if proc.learner.due(time.time()):
                        commit(consumer, tps, proc.update())
            if proc.learner.due(time.time()):
                commit(consumer, tps, proc.update())
            proc.export()
    finally:
        consumer.close(autocommit=False)
    return 0


def commit(consumer, tps: dict, report: dict) -> None:
    """The input offsets an update covered: a restart resumes after them, never before."""
    from kafka.structs import OffsetAndMetadata
    consumer.commit({tps[p]: OffsetAndMetadata(o, "", -1) for p, o in report["offsets"].items()})


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from stream_app.runtime import logs
    logs.setup(settings.log_level, settings.log_format)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is one line per connection event
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return run_learner(settings, stop)
