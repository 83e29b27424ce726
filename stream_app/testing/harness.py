"""Running and observing real workers from outside: a worker subprocess, a Prometheus
scrape, a topic reader. The demo, the integration tests and the benchmarks all drive
workers this way, so they exercise exactly what an operator runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
from pydantic import SecretStr

from stream_app.transport.broker import spawn, stop_process
from stream_app.config import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The STREAMREC_* environment that reproduces `settings` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):  # model_dump keeps it masked ('**********')
            value = value.get_secret_value()
        if value is not None:
            env[f"STREAMREC_{name.upper()}"] = str(value)
    return env


def isolated_settings(bootstrap: str, name: str, workdir: Path, **overrides) -> Settings:
    """Settings for a pipeline of its own on a shared broker: its own consumer group,
    topics, state dir and web port, so runs never see each other's data. Topics are created."""
    from stream_app.transport.broker import ensure_topics, free_port

    base = dict(bootstrap_servers=bootstrap, app_id=name, events_topic=f"{name}.events", dlq_topic=f"{name}.dlq",
                recommendations_topic=f"{name}.recs", catalog_topic=f"{name}.catalog",
                trending_topic=f"{name}.trending",
                state_dir=workdir / f"{name}-state", web_port=free_port())
    settings = Settings(**{**base, **overrides})
    ensure_topics(settings)
    return settings


class WorkerProcess:
    """`streamrec worker` (or, with command="learn", the learner) as a child process (dies
    with its parent), log to a file."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None,
                 command: str = "worker") -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.command = command
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        port = self.settings.learn_port if self.command == "learn" else self.settings.web_port
        return f"http://{self.settings.web_host}:{port}"

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **settings_env(self.settings), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = spawn([sys.executable, "-m", "stream_app.cli", self.command], env=env, stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 90.0) -> "WorkerProcess":
        """Until /readyz says the consumer has partitions; fail fast if the process died."""
        return self._wait("/readyz", lambda body: json.loads(body).get("ready"), timeout)

    def wait_metrics(self, timeout: float = 90.0) -> "WorkerProcess":
        """Until /metrics answers (the learner's readiness); fail fast if the process died."""
        return self._wait("/metrics", lambda body: True, timeout)

    def _wait(self, path: str, ok: Callable[[bytes], Any], timeout: float) -> "WorkerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ok(self.get(path, 2)):
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.command} {path} not ready after {timeout}s:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            return resp.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics").decode())

    def partitions(self) -> list[int]:
        """Input partitions the worker owns now ([] while it rebalances or is not up)."""
        try:
            return json.loads(self.get("/readyz"))["partitions"]
        except OSError:  # 503 while rebalancing, or not up yet
            return []

    def stop(self, timeout: float = 20.0) -> int | None:
        stop_process(self.proc, timeout)
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def parse_metrics(text: str) -> dict[str, float]:
    """Exposition text -> {'name{k="v",...}': value} (labels sorted; bare name if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class TopicReader:
    """Reads every partition of a topic from the beginning, without a consumer group."""

    def __init__(self, bootstrap: str, topic: str, options: dict[str, Any] | None = None) -> None:
        """`options`: security arguments from stream_app.transport.security.kafka_python_options."""
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      auto_offset_reset="earliest", group_id=None, **(options or {}))
        deadline = time.monotonic() + 30
        partitions = None
        while not partitions and time.monotonic() < deadline:
            partitions = self.consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            raise TimeoutError(f"topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)

    def poll(self, timeout_ms: int = 200) -> Iterator:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            yield from records

    def read_until(self, done: Callable[[list], bool], timeout: float) -> list:
        """Collect records until done(records) or timeout; returns what was read."""
        records: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(records):
            records.extend(self.poll())
        return records

    def read_to_end(self, timeout: float = 60.0) -> list:
        """Everything up to the end offsets as of now (a snapshot, even while others write)."""
        tps = list(self.consumer.assignment())
        ends = self.consumer.end_offsets(tps)
        records: list = []
        deadline = time.monotonic() + timeout
        while any(self.consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {tps[0].topic} to its end in {timeout}s")
            records.extend(self.poll())
        return records

    def close(self) -> None:
        self.consumer.close()


class RecommendationWatcher(threading.Thread):
    """Reads the recommendations topic like any subscriber, in the background: the latest
    record per user (most recently updated last), (generated_at, latency_ms) samples and
    counts, in all and by model_version. A tombstone (forgotten user) drops the user's
    latest record."""

    def __init__(self, bootstrap: str, topic: str, max_samples: int | None = 200_000,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.reader = TopicReader(bootstrap, topic, options)
        self.latest: dict[str, dict] = {}
        self.samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self.count = 0
        self.by_model: Counter[str] = Counter()
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for record in self.reader.poll(200):
                if record.value is None:
                    self.latest.pop((record.key or b"").decode(errors="replace"), None)
                    continue
                rec = orjson.loads(record.value)
                self.latest.pop(rec["user_id"], None)
                self.latest[rec["user_id"]] = rec
                self.samples.append((rec["generated_at"], rec["latency_ms"]))
                self.count += 1
                self.by_model[rec["model_version"]] += 1
        self.reader.close()

    def model_shares(self) -> dict[str, float]:
        """Share of records by model_version, most frequent first."""
        total = sum(self.by_model.values())
        return {version: round(n / total, 3) for version, n in self.by_model.most_common()} if total else {}

    def latencies(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Sorted latencies (ms) of records generated in [start, end)."""
        return sorted(lat for t, lat in list(self.samples) if start <= t < end)

    def close(self) -> None:
        self.stop_flag.set()
        self.join(5)


def stalled(samples: list[dict], window_s: float) -> bool:
    """Under one event/s processed for `window_s` although events are waiting: samples of
    `t_s`, `events` processed and consumer `lag`, oldest first."""
    recent = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] - window_s]
    return (samples[-1]["t_s"] - samples[0]["t_s"] >= window_s
            and recent[-1]["events"] - recent[0]["events"] < window_s and recent[-1]["lag"] > 0)


def percentile(sorted_data: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted data (nan when empty)."""
    if not sorted_data:
        return float("nan")
    return sorted_data[min(len(sorted_data) - 1, int(len(sorted_data) * q))]


def learner_committed(settings: Settings) -> dict[int, int]:
    """The events topic's offsets the learner's consumer group has committed, by partition
    (partitions never committed are absent)."""
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.learn_group,
                      enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in c.partitions_for_topic(settings.events_topic)]
        offsets = {tp.partition: c.committed(tp) for tp in tps}
        return {p: o for p, o in offsets.items() if o is not None}
    finally:
        c.close()
