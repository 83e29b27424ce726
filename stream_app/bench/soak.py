"""Soak: a steady stream for a long time, watching what a slow leak would show: the
worker's RSS, its state (users, bytes on disk) and its KV cache, sampled over time.

The verdict is RSS growth after warm-up (caches and RocksDB memtables fill during
warm-up by design, bounded by cache_mb and RocksDB's own limits); a leak shows up as
steady growth after that. The worker serves a random-weight model of the pipeline
benchmark's shape, so the KV cache and the item scorer are exercised as in production.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

NEEDS = ("psutil", "matplotlib")  # the [bench] extra, checked before the run starts
EXAMPLES = """examples:
  streamrec bench soak --minutes 30 --rate 2000 --json soak.json --plot soak.png
  streamrec bench soak --minutes 3 --rate 500          # a quick look
  streamrec bench soak --minutes 40 --rate 2000 --bootstrap kafka:9092   # on a real Kafka
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="offered events/s")
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a third of the run, at most 5")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=24_000)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--bootstrap", default="", help="run on this Kafka (host:port; STREAMREC_SECURITY_* "
                        "apply) instead of an embedded broker, whose memory store stalls once a partition holds "
                        "~50k batches")
    parser.add_argument("--stall-s", type=float, default=60.0, help="stop if nothing is processed for this long")
    parser.add_argument("--json", type=Path, default=Path("soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("soak.png"))


ROCKSDB_KINDS = ("memtables", "table_readers", "block_cache")


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def sample(worker, proc, state_dir: Path, t0: float) -> dict:
    from stream_app.testing.harness import metric_sum

    m = worker.metrics()
    rocksdb = {f"rocksdb_{kind}_mb": mb(m, f'streamrec_rocksdb_memory_bytes{{kind="{kind}"}}') for kind in ROCKSDB_KINDS}
    return {"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "users": int(m.get("streamrec_users_in_state", 0)), "state_mb": round(dir_mb(state_dir), 1),
            "cache_slots": int(m.get('streamrec_cache_slots{state="used"}', 0)),
            "fallback_entries": int(m.get("streamrec_fallback_entries", 0)),
            "events": int(metric_sum(m, "streamrec_events_total")),
            "lag": int(metric_sum(m, "streamrec_consumer_lag")),
            **rocksdb, "rocksdb_mb": round(sum(rocksdb.values()), 1),
            "heap_in_use_mb": mb(m, 'streamrec_heap_bytes{state="in_use"}'),
            "heap_free_mb": mb(m, 'streamrec_heap_bytes{state="free"}')}


def mb(metrics: dict, name: str) -> float:
    return round(metrics.get(name, 0) / 2**20, 1)


def growth(samples: list[dict], warmup_s: float) -> float:
    """RSS growth after warm-up, in %: the last minute's mean vs the first minute's after warm-up."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        return float("nan")
    span = max(1, len(after) // 10)
    first = sum(s["rss_mb"] for s in after[:span]) / span
    last = sum(s["rss_mb"] for s in after[-span:]) / span
    return round(100 * (last - first) / first, 2)


def still_filling(samples: list[dict], warmup_s: float) -> list[str]:
    """Bounded structures that grew more than 5% after warm-up: users in state, the
    co-occurrence fallback (fills its entry budget over ~1M events), RocksDB (fills its
    memory budget). Their growth counts in the RSS verdict but is by design."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        return []
    return [key for key in ("users", "fallback_entries", "rocksdb_mb")
            if after[-1].get(key, 0) > 1.05 * after[0].get(key, 0)]


def plot(samples: list[dict], warmup_s: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for ax, key, label in zip(axes, ("rss_mb", "state_mb", "users", "cache_slots"),
                              ("worker RSS (MB)", "state on disk (MB)", "users in state", "KV cache slots used")):
        ax.plot(t, [s[key] for s in samples])
        ax.axvline(warmup_s / 60, color="grey", ls=":", label="end of warm-up")
        ax.set(xlabel="minutes", title=label)
        ax.grid(alpha=0.3)
    for key, label in (("heap_in_use_mb", "C heap in use"), ("heap_free_mb", "C heap free, kept"),
                       ("rocksdb_mb", "RocksDB")):
        axes[0].plot(t, [s.get(key, 0) for s in samples], lw=1, label=label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    import psutil
    from rich.console import Console

    from stream_app.runtime import allocator
    from stream_app.testing.checkpoints import random_checkpoint
    from stream_app.transport.broker import broker_at
    from stream_app.config import Settings
    from stream_app.testing.harness import WorkerProcess, isolated_settings, stalled
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.traffic import synthetic_messages
    from stream_app.transport.security import kafka_python_options

    console = Console()
    seconds = args.minutes * 60
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 3))
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-soak-"))
    random_checkpoint(workdir / "model", args.items, 64, 2, 50)
    console.print(f"soak: {args.minutes} min at {args.rate:.0f} events/s, {args.users} users, on "
                  f"{args.bootstrap or 'an embedded broker'}; logs in {workdir}")
    samples: list[dict] = []
    options = kafka_python_options(Settings(bootstrap_servers=args.bootstrap))
    with broker_at(args.bootstrap, options) as bootstrap:
        # topics and group of this run only: a shared broker may hold an earlier soak's
        settings = isolated_settings(bootstrap, f"soak-{time.strftime('%Y%m%d-%H%M%S')}", workdir,
                                     model_dir=workdir / "model")
        worker = WorkerProcess(settings, workdir / "worker.log").start().wait_ready(120)
        proc = psutil.Process(worker.proc.pid)
        malloc = allocator.of_process(proc.pid)
        console.print(f"worker allocator: {malloc}")
        # few large batches: the embedded broker lists every stored batch of a partition on
        # each fetch and returns nothing once that outlasts the fetch wait (~50k batches at
        # 50 ms, docs/facts.md), so its lifetime is counted in producer flushes, not events
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic,
                                 {"linger_ms": 200, "batch_size": 256 * 1024, **options})
        feeding = threading.Thread(target=producer.paced, daemon=True,
                                   args=(synthetic_messages(args.users, args.items, seed=3), args.rate, seconds))
        t0 = time.monotonic()
        feeding.start()
        try:
            stalled_at = None
            while feeding.is_alive():
                time.sleep(args.sample_s)
                samples.append(sample(worker, proc, settings.state_dir, t0))
                s = samples[-1]
                console.print(f"{s['t_s'] / 60:5.1f} min  rss {s['rss_mb']:7.1f} MB  state {s['state_mb']:7.1f} MB  "
                              f"users {s['users']:6d}  cache {s['cache_slots']:5d}  events {s['events']:9d}  "
                              f"lag {s['lag']}  rocksdb {s['rocksdb_mb']:.0f} MB  "
                              f"heap {s['heap_in_use_mb']:.0f}+{s['heap_free_mb']:.0f} free MB")
                if stalled(samples, args.stall_s):
                    stalled_at = s["t_s"] / 60
                    console.print(f"no progress for {args.stall_s:.0f} s with {s['lag']} events waiting: stopping "
                                  f"(worker log: {workdir / 'worker.log'})")
                    break
            alive = worker.alive()
        finally:
            producer.close()
            worker.stop()
    pct = growth(samples, warmup_s)
    filling = still_filling(samples, warmup_s)
    sent = samples[-1]["events"] if samples else 0
    result = {"minutes": args.minutes, "rate": args.rate, "users": args.users, "allocator": malloc,
              "broker": args.bootstrap or "embedded", "topic": settings.events_topic,
              "warmup_minutes": warmup_s / 60, "rss_growth_pct": pct,
              "rss_mb_start": next((s["rss_mb"] for s in samples if s["t_s"] >= warmup_s), None),
              "rss_mb_end": samples[-1]["rss_mb"] if samples else None, "events_processed": sent,
              "processed_per_s": round(sent / (samples[-1]["t_s"] if samples else seconds), 1), "worker_alive": alive,
              "stalled_at_min": stalled_at, "bounded_still_filling": filling, "samples": samples}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, warmup_s, args.plot)
    ok = alive and stalled_at is None and pct == pct and pct < 5.0
    console.print(f"RSS growth after warm-up {pct}% ({result['rss_mb_start']} -> {result['rss_mb_end']} MB), "
                  f"{result['processed_per_s']} events/s processed; wrote {args.json} and {args.plot}"
                  + ("" if ok else " — FAILED (growth >= 5%, stalled or worker died)"))
    if filling:
        console.print(f"note: still filling after warm-up (a bounded structure, not a leak; a longer "
                      f"--warmup-minutes leaves it out): {', '.join(filling)}")
    return 0 if ok else 1
