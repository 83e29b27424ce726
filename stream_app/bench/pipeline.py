"""Offered-load sweep against a live worker: sustained events/s, event-to-recommendation
latency, CPU and RSS, for the streaming engine and for a naive baseline in the same run.

The baseline is what a first version would do: one event per batch (so one table write
per event), and a full recompute of the user's vector from history on every event (no
KV cache). Both serve the same checkpoint, a random-weight model of the target shape
(quality is irrelevant to cost), against the embedded broker — the
producer and broker share the CPU with the worker, as the numbers then honestly show.
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stream_app.testing.checkpoints import random_checkpoint

EXAMPLES = """examples:
  streamrec bench pipeline --json pipeline.json
  streamrec bench pipeline --levels 1000 2000 4000 8000 --seconds 15 --plot pipeline.png
  streamrec bench pipeline --workers 2 --levels 4000 8000 12000 --json pipeline_2w.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels", type=float, nargs="+", default=[500, 1000, 2000, 4000, 6000, 8000],
                        help="offered loads for the engine, events/s")
    parser.add_argument("--baseline-levels", type=float, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--seconds", type=float, default=12.0, help="duration of each level")
    parser.add_argument("--items", type=int, default=24_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--history", type=int, default=200, help="events kept per user (history_max)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of one consumer group on the broker (partitions: at least this many)")
    parser.add_argument("--json", type=Path, default=Path("pipeline.json"))
    parser.add_argument("--plot", type=Path, default=Path("pipeline.png"))


class Fleet:
    """N workers of one consumer group, observed as one: summed counters, CPU and RSS."""

    def __init__(self, settings, n: int, name: str, workdir: Path) -> None:
        import psutil

        from stream_app.transport.broker import free_port
        from stream_app.testing.harness import WorkerProcess

        self.workers = [WorkerProcess(settings if i == 0 else settings.model_copy(update={
            "state_dir": workdir / f"{name}-state-{i}", "web_port": free_port()}), workdir / f"{name}-{i}.log").start()
            for i in range(n)]
        for worker in self.workers:
            worker.wait_ready(120)
        self._wait_for_assignment(settings.partitions, timeout=120)
        self.procs = [psutil.Process(w.proc.pid) for w in self.workers]

    def _wait_for_assignment(self, partitions: int, timeout: float) -> None:
        """Until every worker owns partitions and all of them are owned (a settled group)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owned = [w.partitions() for w in self.workers]
            if all(owned) and sum(map(len, owned)) == partitions:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{len(self.workers)} workers did not settle on {partitions} partitions")

    def metrics(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for worker in self.workers:
            for key, value in worker.metrics().items():
                total[key] = total.get(key, 0.0) + value
        return total

    def cpu_seconds(self) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.procs))

    def cpu_percent(self) -> float:
        return sum(p.cpu_percent(None) for p in self.procs)

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self.procs) / 2**20

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def sweep(name: str, settings, levels: list[float], seconds: float, users: int, items: int, workdir: Path,
          console: Console, workers: int = 1) -> list[dict]:
    """Start the worker(s), then offer each load in turn; returns a row per level."""
    from stream_app.testing.harness import RecommendationWatcher, metric_sum, percentile
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.traffic import synthetic_messages

    fleet = Fleet(settings, workers, name, workdir)
    latency = RecommendationWatcher(settings.bootstrap_servers, settings.recommendations_topic, max_samples=None)
    latency.start()
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    messages = synthetic_messages(users, items, seed=1)
    messages = itertools.chain([next(messages)], messages)  # world setup (~15 s at 1M items) is not load time
    rows = []
    try:
        for rate in levels:
            level = list(_take(messages, int(rate * seconds)))  # before the clock: generating costs CPU
            scrape = fleet.metrics()
            before, stages_before = metric_sum(scrape, "streamrec_events_total"), stage_seconds(scrape)
            cpu_before = fleet.cpu_seconds()
            fleet.cpu_percent()
            t0 = time.time()
            sent = producer.paced(level, rate, seconds)
            producer.sent = 0
            elapsed = time.time() - t0
            time.sleep(1.0)  # in-flight tail: latency of the level's last events still counts
            scrape = fleet.metrics()
            done = metric_sum(scrape, "streamrec_events_total") - before
            stages = stage_profile(stages_before, stage_seconds(scrape), fleet.cpu_seconds() - cpu_before, done)
            lat = latency.latencies(t0, t0 + elapsed + 1.0)
            kept_up = done >= 0.97 * sent
            # kept up: everything sent in `elapsed` was processed (the 1 s tail only let the last
            # events land), so that is the sustained rate; behind: the worker was busy throughout
            row = {"engine": name, "workers": workers, "offered": rate, "sent_per_s": round(sent / elapsed, 1),
                   "processed_per_s": round(done / (elapsed if kept_up else elapsed + 1.0), 1), "kept_up": kept_up,
                   "p50_ms": round(percentile(lat, 0.5), 1), "p99_ms": round(percentile(lat, 0.99), 1),
                   "cpu_pct": round(fleet.cpu_percent(), 1), "rss_mb": round(fleet.rss_mb(), 1),
                   "cpu_us_per_event": stages}
            rows.append(row)
            console.print(f"{name:>8} offered {rate:>6.0f}/s  processed {row['processed_per_s']:>7.0f}/s  "
                          f"p50 {row['p50_ms']:>7} ms  p99 {row['p99_ms']:>7} ms  cpu {row['cpu_pct']}%")
            if not row["kept_up"]:
                _drain(fleet, before + sent, timeout=60)
    finally:
        producer.close()
        latency.close()
        fleet.stop()
    return rows


STAGE_NAMES = {  # stage -> what it covers, in the order of the batch path
    "framework": "fetch, Faust delivery and streams, asyncio, aiokafka, commits (CPU not in a stage)",
    "decode": "decode and validate events, route bad ones",
    "state_read": "state cache lookup; table read and JSON decode on a miss",
    "update": "dedupe, append, co-occurrence update",
    "rank": "recommend: the KV-cache step or rebuild and scoring, plus building records",
    "rank.inference": "  of which transformer step/rebuild",
    "rank.scoring": "  of which top-k scoring",
    "state_write": "table write: RocksDB put and changelog send",
    "send": "recommendation, DLQ, re-key and tombstone sends",
    "total": "process CPU per event",
}


def stage_seconds(scrape: dict[str, float]) -> dict[str, float]:
    """Cumulative loop seconds by stage (streamrec_stage_seconds_total) and inference path."""
    from stream_app.metrics import STAGES
    out = {s: scrape.get(f'streamrec_stage_seconds_total{{stage="{s}"}}', 0.0) for s in STAGES}
    for path in ("step", "rebuild", "score"):
        out[path] = scrape.get(f'streamrec_inference_seconds_sum{{path="{path}"}}', 0.0)
    return out


def stage_profile(before: dict[str, float], after: dict[str, float], cpu_s: float, events: float) -> dict:
    """CPU µs per event by stage over one level; what no stage timed is the framework's."""
    if events <= 0:
        return {}
    per = {k: (after[k] - before[k]) * 1e6 / events for k in after}
    staged = sum(per[s] for s in ("decode", "state_read", "update", "rank", "state_write", "send"))
    total = cpu_s * 1e6 / events
    profile = {"framework": total - staged, **{s: per[s] for s in ("decode", "state_read", "update", "rank")},
               "rank.inference": per["step"] + per["rebuild"], "rank.scoring": per["score"],
               "state_write": per["state_write"], "send": per["send"], "total": total}
    return {k: round(v, 1) for k, v in profile.items()}


def stage_table(rows: list[dict], rate: float) -> Table | None:
    """The stage profile of each engine at the offered `rate`."""
    at = [r for r in rows if r["offered"] == rate and r.get("cpu_us_per_event")]
    if not at:
        return None
    table = Table(title=f"CPU µs per event by stage, at {rate:.0f} events/s offered")
    table.add_column("stage")
    for r in at:
        table.add_column(r["engine"], justify="right")
    table.add_column("covers")
    for stage, covers in STAGE_NAMES.items():
        table.add_row(stage, *(str(r["cpu_us_per_event"].get(stage, "")) for r in at), covers)
    return table


def _take(it, n: int):
    for _ in range(n):
        yield next(it)


def _drain(fleet: Fleet, target: float, timeout: float) -> None:
    """Let workers that fell behind catch up before the next level starts."""
    from stream_app.testing.harness import metric_sum
    deadline = time.time() + timeout
    while time.time() < deadline and metric_sum(fleet.metrics(), "streamrec_events_total") < target:
        time.sleep(0.5)


def summarize(rows: list[dict], engine: str) -> tuple[float, float | None]:
    mine = [r for r in rows if r["engine"] == engine]
    best = max((r["processed_per_s"] for r in mine), default=0.0)
    at_2000 = next((r["p99_ms"] for r in mine if r["offered"] == 2000), None)
    return best, at_2000


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, style in (("engine", "o-"), ("naive", "s--")):
        mine = [r for r in rows if r["engine"] == engine]
        a.plot([r["offered"] for r in mine], [r["processed_per_s"] for r in mine], style, label=engine)
        b.plot([r["offered"] for r in mine], [r["p99_ms"] for r in mine], style, label=engine)
    top = max(r["offered"] for r in rows)
    a.plot([0, top], [0, top], ":", color="grey", label="offered")
    a.set(xlabel="offered events/s", ylabel="processed events/s", title="throughput")
    b.set(xlabel="offered events/s", ylabel="p99 latency (ms)", title="event → recommendation p99", yscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    from stream_app.transport.broker import EmbeddedBroker
    from stream_app.testing.harness import isolated_settings

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    version = random_checkpoint(workdir / "model", args.items, args.dim, args.layers, args.window)
    console.print(f"checkpoint {version}: {args.items} items, dim {args.dim}, {args.layers} layers, "
                  f"window {args.window}; history {args.history}; logs in {workdir}")
    rows: list[dict] = []
    with EmbeddedBroker() as broker:
        for name, levels, extra in (("engine", args.levels, {}),
                                    ("naive", args.baseline_levels, {"batch_max": 1, "incremental": False})):
            workers = args.workers if name == "engine" else 1
            settings = isolated_settings(broker.bootstrap, f"bench-{name}", workdir, model_dir=workdir / "model",
                                         history_max=args.history, **extra,
                                         **({"partitions": max(4, workers)} if workers > 1 else {}))
            rows += sweep(name, settings, levels, args.seconds, args.users, args.items, workdir, console, workers)
    best, p99_2000 = summarize(rows, "engine")
    base, _ = summarize(rows, "naive")
    result = {"workers": args.workers, "max_events_per_s": best, "p99_ms_at_2000": p99_2000, "baseline_max_events_per_s": base,
              "speedup_vs_baseline": round(best / base, 2) if base else None,
              "stage_profile_at_2000": next((r["cpu_us_per_event"] for r in rows
                                             if r["engine"] == "engine" and r["offered"] == 2000), None),
              "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "_bench_run")},
              "levels": rows}
    table = Table(title="pipeline benchmark (per worker)")
    for col in ("engine", "offered", "processed_per_s", "p50_ms", "p99_ms", "cpu_pct", "rss_mb"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("engine", "offered", "processed_per_s", "p50_ms", "p99_ms",
                                              "cpu_pct", "rss_mb")))
    console.print(table)
    stages = stage_table(rows, 2000)
    if stages is not None:
        console.print(stages)
    console.print(f"max_events_per_s {best:.0f} · p99_ms_at_2000 {p99_2000} · baseline {base:.0f} "
                  f"· speedup {result['speedup_vs_baseline']}x")
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(rows, args.plot)
    console.print(f"wrote {args.json} and {args.plot}")
    return 0
