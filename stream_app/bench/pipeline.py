"""Offered-load sweep against a live worker: sustained events/s, event-to-recommendation
latency, CPU and RSS, for the streaming engine and for a naive baseline in the same run.

Each engine first drains a backlog produced before it starts: that peak and its CPU µs per
event by stage are the figures that carry between hosts (the load generator is off the
cores while the worker runs). The sweep then offers fixed loads and fixed fractions of
that peak, for p99 latency. `--retrieval exact ann` runs the engine once per retrieval
mode side by side (docs/design.md, "Two-stage retrieval is exact on its candidates").

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
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from stream_app.testing.checkpoints import random_checkpoint
from stream_app.testing.traffic import send_catalog

NEEDS = ("psutil", "matplotlib")  # the [bench] extra, checked before the run starts
EXAMPLES = """examples:
  streamrec bench pipeline --json pipeline.json
  streamrec bench pipeline --levels 1000 2000 4000 8000 --seconds 15 --plot pipeline.png
  streamrec bench pipeline --workers 2 --levels 4000 8000 12000 --json pipeline_2w.json
  streamrec bench pipeline --items 1000000 --retrieval exact ann --levels 250 1000 --baseline-levels 50
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
    parser.add_argument("--backlog", type=int, default=40_000,
                        help="events produced before each engine starts, drained for its peak (0: skip)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.75],
                        help="extra offered loads as fractions of the drained peak")
    parser.add_argument("--retrieval", nargs="+", default=["auto"], choices=("exact", "ann", "auto"),
                        help="one engine run per retrieval mode (the naive baseline: the first)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout (git worktree add DIR main): its worker runs as engine "
                             "`against` with the same load, an A/B of two revisions in one run")
    parser.add_argument("--surfaces-file", type=Path, default=None,
                        help="a surfaces file: the engines publish with its for_you rules (docs/contracts.md, Rules)")
    parser.add_argument("--plain", action="store_true",
                        help="also run engine `plain`: no rules and no reasons, for their cost in the same run")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of one consumer group on the broker (partitions: at least this many)")
    parser.add_argument("--json", type=Path, default=Path("pipeline.json"))
    parser.add_argument("--plot", type=Path, default=Path("pipeline.png"))


class Snapshot(NamedTuple):
    """One worker's cumulative counters at one scrape."""

    at: float                 # monotonic time of the scrape
    events: float             # streamrec_events_total
    stages: dict[str, float]  # stage_seconds()
    cpu: float                # process CPU seconds


class Fleet:
    """N workers of one consumer group, observed as one: summed counters, CPU and RSS."""

    def __init__(self, settings, n: int, name: str, workdir: Path, settle: bool = True,
                 env: dict[str, str] | None = None) -> None:
        """`settle=False` returns as soon as the processes run (a drain is timed from their
        first processed event, which may come before the group settles); call `settle()`."""
        import psutil

        from stream_app.transport.broker import free_port
        from stream_app.testing.harness import WorkerProcess

        self.settings = settings
        self.workers = [WorkerProcess(settings if i == 0 else settings.model_copy(update={
            "state_dir": workdir / f"{name}-state-{i}", "web_port": free_port()}), workdir / f"{name}-{i}.log",
            extra_env=env).start() for i in range(n)]
        self.procs = [psutil.Process(w.proc.pid) for w in self.workers]
        if settle:
            self.settle()

    def settle(self) -> None:
        for worker in self.workers:
            worker.wait_ready(600)  # a million-item index is built before the worker is ready
        self._wait_for_assignment(self.settings.partitions, timeout=120)

    def snapshots(self) -> list[Snapshot | None]:
        """Per worker, or None while it does not answer: its web server starts before its
        consumer, so one not up yet has processed nothing."""
        from stream_app.testing.harness import metric_sum
        out = []
        for worker, proc in zip(self.workers, self.procs):
            if worker.proc.poll() is not None:
                raise RuntimeError("a worker exited; see its log in the bench workdir")
            try:
                scrape = worker.metrics()
            except OSError:
                out.append(None)
                continue
            times = proc.cpu_times()
            out.append(Snapshot(time.monotonic(), metric_sum(scrape, "streamrec_events_total"), stage_seconds(scrape),
                                times.user + times.system))
        return out

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
          console: Console, workers: int = 1, backlog: int = 0, fractions: tuple[float, ...] = (),
          env: dict[str, str] | None = None) -> list[dict]:
    """Produce the backlog, start the worker(s) and time its drain, then offer each load
    (fixed, then fractions of the drained peak) in turn; returns a row per level."""
    from stream_app.testing.harness import RecommendationWatcher, metric_sum, percentile
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.traffic import synthetic_messages

    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    messages = synthetic_messages(users, items, seed=1)
    messages = itertools.chain([next(messages)], messages)  # world setup (~15 s at 1M items) is not load time
    if backlog:
        producer.paced(list(_take(messages, backlog)), None)
        producer.sent = 0
    fleet = Fleet(settings, workers, name, workdir, settle=not backlog, env=env)
    rows = [drained(name, fleet, backlog, workers, console)] if backlog else []
    fleet.settle()
    if rows and fractions:
        levels = sorted(set(levels) | {round(f * rows[0]["processed_per_s"], -1) for f in fractions})
    latency = RecommendationWatcher(settings.bootstrap_servers, settings.recommendations_topic, max_samples=None)
    latency.start()
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
    "rank.rules": "  of which the list's rules (filters, diversity, boosts)",
    "rank.reasons": "  of which a reason per item",
    "state_write": "table write: RocksDB put and changelog send",
    "send": "recommendation, DLQ, re-key and tombstone sends",
    "total": "process CPU per event",
}


def stage_seconds(scrape: dict[str, float]) -> dict[str, float]:
    """Cumulative loop seconds by stage (streamrec_stage_seconds_total) and inference path."""
    from stream_app.metrics import STAGES
    out = {s: scrape.get(f'streamrec_stage_seconds_total{{stage="{s}"}}', 0.0) for s in STAGES}
    for path in ("step", "rebuild", "score", "rules", "reasons"):
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
               "rank.rules": per["rules"], "rank.reasons": per["reasons"],
               "state_write": per["state_write"], "send": per["send"], "total": total}
    return {k: round(v, 1) for k, v in profile.items()}


def stage_table(rows: list[dict], rate: float | str) -> Table | None:
    """The stage profile of each engine at the offered `rate` ("backlog": while draining)."""
    at = [r for r in rows if r["offered"] == rate and r.get("cpu_us_per_event")]
    if not at:
        return None
    when = "while draining the backlog" if rate == "backlog" else f"at {rate:.0f} events/s offered"
    table = Table(title=f"CPU µs per event by stage, {when}")
    table.add_column("stage")
    for r in at:
        table.add_column(r["engine"], justify="right")
    table.add_column("covers")
    for stage, covers in STAGE_NAMES.items():
        table.add_row(stage, *(str(r["cpu_us_per_event"].get(stage, "")) for r in at), covers)
    return table


def drained(name: str, fleet: Fleet, backlog: int, workers: int, console: Console,
            timeout: float = 900) -> dict:
    """The peak: events/s while the fleet works through a backlog produced before it started,
    with the CPU by stage. Each worker is measured from its last scrape before its first
    processed event (its start-up CPU stays out), the fleet from the first worker's start:
    a sum over scrapes that all workers answer would start late, or miss the drain entirely
    when one worker drains a small backlog before its peer's web server is up."""
    deadline = time.monotonic() + timeout
    base: list[Snapshot | None] = [None] * len(fleet.workers)  # the last scrape before the first event
    last: list[Snapshot | None] = [None] * len(fleet.workers)
    done = 0.0
    while time.monotonic() < deadline:
        for i, snap in enumerate(fleet.snapshots()):
            if snap is None:
                continue
            if base[i] is None or base[i].events == 0 == snap.events:
                base[i] = snap
            last[i] = snap
        done = sum(s.events for s in last if s)
        if done >= backlog:
            break
        time.sleep(0.1)
    end = time.monotonic()
    started = [(b, s) for b, s in zip(base, last) if b and s and s.events > b.events]
    if not started:
        raise RuntimeError(f"{name}: no event of the backlog was processed in {timeout:.0f} s")
    n = sum(s.events - b.events for b, s in started)
    cpu = sum(s.cpu - b.cpu for b, s in started)
    stages_before = {k: sum(b.stages[k] for b, _ in started) for k in started[0][0].stages}
    stages_after = {k: sum(s.stages[k] for _, s in started) for k in started[0][0].stages}
    seconds = max(end - min(b.at for b, _ in started), 1e-9)
    row = {"engine": name, "workers": workers, "offered": "backlog", "sent_per_s": None,
           "processed_per_s": round(n / seconds, 1), "kept_up": done >= backlog,
           "p50_ms": None, "p99_ms": None, "cpu_pct": round(100 * cpu / seconds, 1),
           "rss_mb": round(fleet.rss_mb(), 1), "cpu_us_per_event": stage_profile(stages_before, stages_after, cpu, n)}
    console.print(f"{name:>8} drained {n:,.0f} backlog events at {row['processed_per_s']:,.0f}/s  "
                  f"cpu {row['cpu_pct']}%  {row['cpu_us_per_event'].get('total')} µs/event")
    return row


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
    """Best sustained rate of the offered-load sweep (the drained peak is reported apart)."""
    mine = [r for r in rows if r["engine"] == engine and r["offered"] != "backlog"]
    best = max((r["processed_per_s"] for r in mine), default=0.0)
    at_2000 = next((r["p99_ms"] for r in mine if r["offered"] == 2000), None)
    return best, at_2000


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    swept = [r for r in rows if r["offered"] != "backlog"]
    for engine in dict.fromkeys(r["engine"] for r in swept):
        style = "s--" if engine == "naive" else "o-"
        mine = sorted((r for r in swept if r["engine"] == engine), key=lambda r: r["offered"])
        a.plot([r["offered"] for r in mine], [r["processed_per_s"] for r in mine], style, label=engine)
        b.plot([r["offered"] for r in mine], [r["p99_ms"] for r in mine], style, label=engine)
    top = max(r["offered"] for r in swept)
    a.plot([0, top], [0, top], ":", color="grey", label="offered")
    a.set(xlabel="offered events/s", ylabel="processed events/s", title="throughput")
    b.set(xlabel="offered events/s", ylabel="p99 latency (ms)", title="event → recommendation p99", yscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def engines(args: argparse.Namespace) -> list[tuple[str, list[float], dict, dict | None]]:
    """(name, offered levels, settings overrides, worker env): one engine per retrieval mode,
    the other revision's worker (`--against`), then the naive baseline."""
    rules = {"surfaces_file": args.surfaces_file} if getattr(args, "surfaces_file", None) else {}
    out = [("engine" if len(args.retrieval) == 1 else f"engine-{mode}", args.levels, {"retrieval": mode, **rules},
            None) for mode in args.retrieval]
    if getattr(args, "plain", False):
        out.append(("plain", args.levels, {"retrieval": args.retrieval[0], "reasons": False}, None))
    if getattr(args, "against", None):
        out.append(("against", args.levels, {"retrieval": args.retrieval[0]},
                    {"PYTHONPATH": str(Path(args.against).resolve())}))
    return out + [("naive", args.baseline_levels,
                   {"batch_max": 1, "incremental": False, "retrieval": args.retrieval[0]}, None)]


def summary(rows: list[dict], engine: str) -> dict:
    best, p99_2000 = summarize(rows, engine)
    drain = next((r for r in rows if r["engine"] == engine and r["offered"] == "backlog"), None)
    swept = {str(r["offered"]): r["p99_ms"] for r in rows if r["engine"] == engine and r["offered"] != "backlog"}
    return {"max_events_per_s": best, "drained_peak_per_s": drain and drain["processed_per_s"],
            "cpu_us_per_event_drained": drain and drain["cpu_us_per_event"], "p99_ms_at_2000": p99_2000,
            "p99_ms_by_offered": swept}


def run(args: argparse.Namespace) -> int:
    from stream_app.transport.broker import EmbeddedBroker
    from stream_app.testing.harness import isolated_settings

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    version = random_checkpoint(workdir / "model", args.items, args.dim, args.layers, args.window)
    console.print(f"checkpoint {version}: {args.items} items, dim {args.dim}, {args.layers} layers, "
                  f"window {args.window}; history {args.history}; logs in {workdir}")
    rows: list[dict] = []
    plan = engines(args)
    with EmbeddedBroker() as broker:
        for name, levels, extra, env in plan:
            workers = args.workers if name != "naive" else 1
            settings = isolated_settings(broker.bootstrap, f"bench-{name}", workdir, model_dir=workdir / "model",
                                         history_max=args.history, **extra,
                                         **({"partitions": max(4, workers)} if workers > 1 else {}))
            if getattr(args, "surfaces_file", None):  # rules need what the catalog says of items: every engine gets it
                send_catalog(settings, args.items)
            rows += sweep(name, settings, levels, args.seconds, args.users, args.items, workdir, console, workers,
                          args.backlog if name != "naive" else 0, tuple(args.fractions) if name != "naive" else (),
                          env)
    by_engine = {name: summary(rows, name) for name, _, _, _ in plan}
    main = by_engine[plan[0][0]]
    base = by_engine["naive"]["max_events_per_s"]
    result = {"workers": args.workers, **main, "baseline_max_events_per_s": base,
              "speedup_vs_baseline": round(main["max_events_per_s"] / base, 2) if base else None,
              "stage_profile_at_2000": next((r["cpu_us_per_event"] for r in rows
                                             if r["engine"] == plan[0][0] and r["offered"] == 2000), None),
              "engines": by_engine,
              "config": {k: v for k, v in vars(args).items()
                         if k not in ("json", "plot") and not k.startswith("_bench")},
              "levels": rows}
    table = Table(title="pipeline benchmark (per worker)")
    for col in ("engine", "offered", "processed_per_s", "p50_ms", "p99_ms", "cpu_pct", "rss_mb"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("engine", "offered", "processed_per_s", "p50_ms", "p99_ms",
                                              "cpu_pct", "rss_mb")))
    console.print(table)
    for rate in ("backlog", 2000):
        stages = stage_table(rows, rate)
        if stages is not None:
            console.print(stages)
    for name, fig in by_engine.items():
        console.print(f"{name}: drained peak {fig['drained_peak_per_s']} · best swept {fig['max_events_per_s']:.0f} "
                      f"· p99_ms_at_2000 {fig['p99_ms_at_2000']}")
    console.print(f"speedup vs naive {result['speedup_vs_baseline']}x")
    for other, what in (("plain", "with rules and reasons vs plain"),
                        ("against", f"against {getattr(args, 'against', None)}")):
        if other in by_engine:  # the first engine's figures over the other's, from the same run
            ratio = {k: round(main[k] / by_engine[other][k], 3) if main[k] and by_engine[other][k] else None
                     for k in ("drained_peak_per_s", "max_events_per_s")}
            result[f"vs_{other}"] = ratio
            console.print(f"{what}: drained peak {ratio['drained_peak_per_s']}x, best swept {ratio['max_events_per_s']}x")
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(rows, args.plot)
    console.print(f"wrote {args.json} and {args.plot}")
    return 0
