"""Bulk replay: every user's history of a public dataset sent as fast as a kafka-python
producer goes, then the recommendations topic read until each user's latest record
answers their last event. The end-to-end rate is compared with the worker's own
processing rate in the same run: a replay should drain at the worker's pace, not the
broker's (docs/benchmarks.md, "Bulk replay")."""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

EXAMPLES = """examples:
  streamrec bench replay --data beauty.pairs.gz --json replay.json
  streamrec bench replay --data sports.pairs.gz --users 5000 --linger-ms 100 --batch-kb 512
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="interactions file (user item [ts] per line, time-ordered)")
    parser.add_argument("--users", type=int, default=0, help="replay this many users (0: all)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model directory the worker serves (default: the co-occurrence engine)")
    parser.add_argument("--linger-ms", type=int, default=0, help="producer linger (kafka-python default 0)")
    parser.add_argument("--batch-kb", type=int, default=16, help="producer batch size (kafka-python default 16)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=Path("replay.json"))


class ProcessedSampler(threading.Thread):
    """streamrec_events_total once a second: when the worker started and finished."""

    def __init__(self, worker, target: int) -> None:
        super().__init__(daemon=True)
        self.worker, self.target = worker, target
        self.first: float | None = None
        self.last: float | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from stream_app.testing.harness import metric_sum
        while not self.stop_flag.wait(1.0):
            done = metric_sum(self.worker.metrics(), "streamrec_events_total")
            if done and self.first is None:
                self.first = time.monotonic()
            if done >= self.target:
                self.last = time.monotonic()
                return


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from model.data import leave_one_out, load
    from stream_app.testing.harness import WorkerProcess, isolated_settings
    from stream_app.testing.replay import replay
    from stream_app.transport.broker import EmbeddedBroker

    console = Console()
    _, _, test = leave_one_out(load(args.data))
    splits = test[: args.users] if args.users else test
    events = sum(len(s.context) for s in splits)
    console.print(f"replay: {events:,} events of {len(splits):,} users from {args.data}; producer linger "
                  f"{args.linger_ms} ms, batches {args.batch_kb} KiB")
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-replay-"))
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "replay", workdir, history_max=200,
                                     **({"model_dir": args.checkpoint} if args.checkpoint else {}))
        worker = WorkerProcess(settings, workdir / "worker.log").start().wait_ready(120)
        sampler = ProcessedSampler(worker, events)
        sampler.start()
        try:
            t0 = time.monotonic()
            published = replay(settings, splits, timeout=args.timeout, say=console.print,
                               producer_options={"linger_ms": args.linger_ms, "batch_size": args.batch_kb * 1024})
            seconds = time.monotonic() - t0
            sampler.join(5)
        finally:
            sampler.stop_flag.set()
            worker.stop()
    worker_s = (sampler.last - sampler.first) if sampler.first and sampler.last else None
    result = {"events": events, "users": len(splits), "answered": len(published),
              "end_to_end_s": round(seconds, 1), "end_to_end_events_per_s": round(events / seconds, 1),
              "worker_events_per_s": round(events / worker_s, 1) if worker_s else None,
              "config": {k: str(v) for k, v in vars(args).items() if k != "json" and not k.startswith("_bench")}}
    if worker_s:
        result["end_to_end_vs_worker"] = round(result["end_to_end_events_per_s"] / result["worker_events_per_s"], 3)
    console.print(f"answered {len(published):,}/{len(splits):,} users; end to end {result['end_to_end_events_per_s']:,.0f}"
                  f" events/s, worker {result['worker_events_per_s']} events/s")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0 if len(published) == len(splits) else 1
