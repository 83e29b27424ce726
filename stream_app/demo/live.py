"""The whole product on one machine: embedded broker, a worker process serving the
transformer, a synthetic producer (with a trickle of malformed messages), and a live view.

The worker runs as a separate process, exactly as in production, and the view reads
what any subscriber would read: the recommendations topic and the worker's /metrics.
The model is trained once on the demo's own synthetic world (stream_app/demo/world.py)."""
from __future__ import annotations

import argparse
import itertools
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from stream_app.config import Settings, add_settings_arguments, settings_from_args
from stream_app.errors import UserError
from stream_app.testing.harness import RecommendationWatcher, metric_sum, percentile, stalled

EXAMPLES = """examples:
  streamrec demo                         # until Ctrl-C
  streamrec demo --duration 60 --json demo.json
  streamrec demo --rate 1000 --users 5000 --items 20000
  streamrec demo --model cooccurrence    # the baseline alone, no training
"""

# The embedded broker lists every stored batch of a partition on each fetch and returns
# nothing once that outlasts the fetch wait (docs/facts.md, Tansu), so its life is counted in
# batches: at 300 events/s, 50 ms batches are ~16 per partition per second, 5 ms ~49.
EMBEDDED_PRODUCER = {"linger_ms": 50, "batch_size": 256 * 1024}
STALL_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=300, help="synthetic events/s (default: 300)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bad-rate", type=float, default=0.01, help="share of malformed messages (default: 0.01)")
    parser.add_argument("--json", type=Path, default=None, help="write the final summary here")
    parser.add_argument("--model", choices=("transformer", "cooccurrence"), default="transformer",
                        help="transformer (default): train once on the demo's world and serve it, "
                             "co-occurrence answering users it cannot represent; or co-occurrence alone. "
                             "A configured --model-dir is served as it is")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where the demo's trained model is kept (default: ~/.cache/streamrec/demo)")
    add_settings_arguments(parser)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {host}:{port} is in use (another worker?); pass --web-port N "
                            "or set STREAMREC_WEB_PORT") from None


def _snapshot(worker, watcher: RecommendationWatcher, sent: int, started: float) -> dict:
    try:
        m = worker.metrics()
    except OSError:
        m = {}
    lat = watcher.latencies()
    p50, p99 = (percentile(lat, 0.5), percentile(lat, 0.99)) if lat else (0.0, 0.0)
    elapsed = time.monotonic() - started
    events = int(metric_sum(m, "streamrec_events_total"))
    return {"elapsed_s": round(elapsed, 1), "sent": sent, "events": events,
            "lag": int(metric_sum(m, "streamrec_consumer_lag")),
            "events_per_s": round(events / elapsed, 1) if elapsed else 0.0,
            "recommendations": watcher.count, "dlq": int(metric_sum(m, "streamrec_invalid_events_total")),
            "users": int(m.get("streamrec_users_in_state", 0)), "p50_ms": p50, "p99_ms": p99,
            "models": watcher.model_shares(), **_inference_costs(m)}


def _inference_costs(m: dict[str, float]) -> dict[str, float | None]:
    """What the transformer costs per refreshed user: a KV-cache step (one token per new
    event) against a rebuild from the stored history, and how often the cache hits."""
    hits, misses = m.get("streamrec_cache_hits_total", 0.0), m.get("streamrec_cache_misses_total", 0.0)

    def per(path: str, n: float) -> float | None:
        return round(1e6 * m.get(f'streamrec_inference_seconds_sum{{path="{path}"}}', 0.0) / n, 1) if n else None

    return {"step_us_per_user": per("step", hits), "rebuild_us_per_user": per("rebuild", misses),
            "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None}


def _view(snap: dict, watcher: RecommendationWatcher) -> Group:
    stats = Table(title="streamrec demo", show_header=False, min_width=60)
    for label, key in [("elapsed (s)", "elapsed_s"), ("events processed", "events"), ("events/s", "events_per_s"),
                       ("recommendations", "recommendations"), ("DLQ (malformed)", "dlq"),
                       ("users in state", "users"), ("latency p50 (ms)", "p50_ms"), ("latency p99 (ms)", "p99_ms"),
                       ("KV-cache step (µs/user)", "step_us_per_user"),
                       ("rebuild from history (µs/user)", "rebuild_us_per_user"), ("KV-cache hit rate", "cache_hit_rate")]:
        stats.add_row(label, "-" if snap[key] is None else str(snap[key]))
    for version, share in snap["models"].items():
        stats.add_row(f"answered by {version}", f"{share:.0%}")
    recs = Table(title="latest recommendations", min_width=60)
    for col in ("user", "newest event", "model", "top items"):
        recs.add_column(col)
    for rec in list(watcher.latest.values())[-6:]:
        items = ", ".join(i["item_id"] for i in rec["items"][:5])
        recs.add_row(rec["user_id"], rec["event_id"], rec["model_version"], items)
    return Group(stats, recs)


def run(args: argparse.Namespace) -> int:
    from stream_app.transport.broker import kafka_for
    from stream_app.testing.harness import WorkerProcess
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.traffic import synthetic_messages

    settings: Settings = settings_from_args(args)
    _check_port_free(settings.web_host, settings.web_port)
    console = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
    if args.model == "transformer" and settings.model_dir is None:
        from stream_app.demo.world import default_cache, demo_model

        model = demo_model(args.users, args.items, args.seed, args.model_cache or default_cache(), console)
        settings = settings.model_copy(update={"model_dir": model})
    with kafka_for(settings) as ready:
        if settings.embedded:  # a memory broker's offsets die with it: start from empty state
            ready = ready.model_copy(update={"state_dir": workdir / "state"})
        # one pasteable line: the README's producer and subscriber examples read this variable
        console.print(f"export STREAMREC_BOOTSTRAP_SERVERS={ready.bootstrap_servers}   "
                      "# the demo's broker: produce and subscribe here", soft_wrap=True, highlight=False)
        console.print(f"worker log {workdir / 'worker.log'} · "
                      f"metrics http://{ready.web_host}:{ready.web_port}/metrics")
        worker = WorkerProcess(ready, workdir / "worker.log").start()
        try:
            with console.status("starting worker (joins its consumer group in ~5-10 s)..."):
                worker.wait_ready()
            summary = _stream(args, ready, worker, console, EventProducer, synthetic_messages, settings.embedded)
        finally:
            worker.stop()
    _report(summary, console, args.json)
    return 0


class StallWarning:
    """Says once, in one line, when the worker stops making progress with events waiting:
    on the embedded broker that is its memory store's limit, and a silent view would
    look like a hung worker."""

    def __init__(self, console: Console, embedded: bool) -> None:
        self.console, self.embedded = console, embedded
        self.samples: list[dict] = []
        self.at_s: float | None = None

    def check(self, snap: dict) -> None:
        if self.at_s is not None or (self.samples and snap["elapsed_s"] - self.samples[-1]["t_s"] < 5):
            return
        self.samples.append({"t_s": snap["elapsed_s"], "events": snap["events"], "lag": snap["lag"]})
        if stalled(self.samples, STALL_S):
            self.at_s = snap["elapsed_s"]
            why = ("the embedded broker stops serving a partition that holds ~50k batches (docs/facts.md, Tansu): "
                   "restart the demo, or run it on a real Kafka (STREAMREC_BOOTSTRAP_SERVERS)"
                   if self.embedded else "check the worker log and the broker")
            self.console.print(f"no events processed for {STALL_S:.0f} s with {snap['lag']} waiting; {why}")


def _stream(args, settings: Settings, worker, console: Console, producer_cls, messages_fn, embedded: bool) -> dict:
    from stream_app.transport.security import kafka_python_options

    options = kafka_python_options(settings)
    watcher = RecommendationWatcher(settings.bootstrap_servers, settings.recommendations_topic, options=options)
    watcher.start()
    producer = producer_cls(settings.bootstrap_servers, settings.events_topic,
                            {**(EMBEDDED_PRODUCER if embedded else {}), **options})
    stall = StallWarning(console, embedded)
    stop = threading.Event()
    msgs = itertools.takewhile(lambda _: not stop.is_set(),
                               messages_fn(args.users, args.items, args.seed, args.bad_rate))
    thread = threading.Thread(target=producer.paced, args=(msgs, args.rate), daemon=True)
    started = time.monotonic()
    thread.start()
    deadline = started + args.duration if args.duration else float("inf")
    try:
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4) as live:
                while time.monotonic() < deadline:
                    snap = _snapshot(worker, watcher, producer.sent, started)
                    live.update(_view(snap, watcher))
                    stall.check(snap)
                    time.sleep(0.25)
        else:  # logs and CI: a plain status line every 5 s
            while time.monotonic() < deadline:
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                snap = _snapshot(worker, watcher, producer.sent, started)
                console.print(json.dumps(snap))
                stall.check(snap)
    except KeyboardInterrupt:
        pass
    stop.set()
    thread.join(5)
    producer.close()
    time.sleep(2.0)  # let the tail of the stream come through
    summary = {**_snapshot(worker, watcher, producer.sent, started), "stalled_at_s": stall.at_s}
    watcher.close()
    return summary


def _report(summary: dict, console: Console, path: Path | None) -> None:
    table = Table(title="demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, str(value))
    Console().print(table)
    if path is not None:
        path.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"summary written to {path}")
