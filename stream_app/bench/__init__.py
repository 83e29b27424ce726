"""Benchmarks. Each prints a table, writes JSON and compares against a baseline measured
in the same run; docs/benchmarks.md's results come from these."""
from __future__ import annotations

import argparse
import importlib

EXAMPLES = """examples:
  streamrec bench inference --json inference.json
  streamrec bench pipeline --json pipeline.json --plot pipeline.png
  streamrec bench hostile --messages 100000 --json hostile.json
  streamrec bench chaos --kills 10 --events 50000 --json chaos.json
  streamrec bench soak --minutes 30 --rate 2000 --json soak.json --plot soak.png
  streamrec bench broker --json broker.json
  streamrec bench quality --data beauty.pairs.gz --json quality.json --plot quality.png
  streamrec bench replay --data beauty.pairs.gz --json replay.json
  streamrec bench freshness --json freshness.json --plot freshness.png
  streamrec bench faults --json faults.json
  streamrec bench retrieval --items 24000 1000000 --json retrieval.json --plot retrieval.png
"""

# name -> module exposing add_arguments(parser) and run(args)
BENCHES = {
    "inference": ("stream_app.bench.inference", "incremental KV-cache step vs full recompute, per event"),
    "pipeline": ("stream_app.bench.pipeline", "offered-load sweep against a live worker vs a naive baseline"),
    "hostile": ("stream_app.bench.hostile", "malformed, redelivered and valid messages mixed: DLQ and state exact"),
    "chaos": ("stream_app.bench.chaos", "SIGKILL the worker mid-stream N times; count lost/duplicated/stale users"),
    "soak": ("stream_app.bench.soak", "a steady stream for M minutes: worker RSS, state and cache over time"),
    "quality": ("stream_app.bench.quality", "train with the defaults; test split, sampled and full ranking, vs baselines"),
    "broker": ("stream_app.bench.broker", "embedded broker: fetch latency as a partition's stored batches grow"),
    "replay": ("stream_app.bench.replay", "bulk replay of a dataset's histories: end-to-end rate vs the worker's"),
    "freshness": ("stream_app.bench.freshness", "drifting stream: continual learner vs frozen model, A/B on a live worker"),
    "retrieval": ("stream_app.bench.retrieval", "HNSW two-stage vs exact top-10: recall, µs per query, build, memory"),
    "faults": ("stream_app.bench.faults", "fault matrix: poison batches, full disk, hostile catalog, bad checkpoints, ..."),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module_name, summary) in BENCHES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=summary, epilog=getattr(module, "EXAMPLES", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run, _bench_needs=getattr(module, "NEEDS", ()))


def run(args: argparse.Namespace) -> int:
    """A benchmark's optional packages (its NEEDS) are checked before it starts anything:
    a plot that fails after a 30-minute soak would lose the run."""
    from stream_app.errors import optional
    for module in args._bench_needs:
        optional(module, "bench", f"streamrec bench {args.bench}")
    return args._bench_run(args)
