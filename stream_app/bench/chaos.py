"""Chaos: SIGKILL the worker at random moments while a stream is produced, restart it on
the same state each time, and judge the end state against an offline replay.

A kill lands a random 0.3-3 s after the worker becomes ready again, which is when it is
busiest: recovering its table from the changelog and working off the backlog that piled
up while it was down. `streamrec bench chaos` runs a large version; the CI test a small one.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

from stream_app.config import Settings
from stream_app.testing.consistency import Verdict, check

EXAMPLES = """examples:
  streamrec bench chaos --kills 10 --events 50000 --json chaos.json
  streamrec bench chaos --kills 3 --events 5000 --rate 500
"""


def run_chaos(settings: Settings, events: list[dict], kills: int, rate: float, workdir: Path,
              seed: int = 0, say=print) -> dict:
    """Produce `events` at `rate` while killing and restarting the worker `kills` times;
    returns the verdict and what happened at each kill."""
    from stream_app.testing.harness import WorkerProcess
    from stream_app.clients.produce import EventProducer

    rng = random.Random(seed)
    log = workdir / "worker.log"
    worker = WorkerProcess(settings, log).start().wait_ready(120)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    feeding = threading.Thread(target=producer.paced, daemon=True, args=(
        ((json.dumps(e).encode(), e["user_id"].encode()) for e in events), rate))
    t0 = time.monotonic()
    feeding.start()
    history = []
    try:
        for n in range(1, kills + 1):
            time.sleep(rng.uniform(0.3, 3.0))
            sent = producer.sent
            worker.kill()
            down = time.monotonic()
            worker = WorkerProcess(settings, log).start().wait_ready(120)
            history.append({"kill": n, "at_s": round(down - t0, 1), "sent_at_kill": sent,
                            "restart_s": round(time.monotonic() - down, 1)})
            say(f"kill {n}/{kills}: {sent}/{len(events)} events sent, back in {history[-1]['restart_s']} s")
        feeding.join()
        producer.close()
        say(f"all {len(events)} events sent; waiting for the worker to catch up")
        verdict = check(settings, events, timeout=300)
    finally:
        worker.stop()
    return {"verdict": verdict, "kills": history, "seconds": round(time.monotonic() - t0, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs during the run")
    parser.add_argument("--events", type=int, default=50_000, help="events produced in total")
    parser.add_argument("--rate", type=float, default=None,
                        help="events/s (default: spread the stream over the kills, ~20 s per restart)")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("chaos.json"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stream_app.transport.broker import EmbeddedBroker
    from stream_app.testing.harness import isolated_settings
    from stream_app.testing.synth import generate

    console = Console()
    rate = args.rate or max(200.0, args.events / (max(1, args.kills) * 20.0))
    events, _ = generate(users=args.users, items=max(500, args.users), events=args.events, seed=args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-chaos-"))
    console.print(f"chaos: {args.events} events at {rate:.0f}/s, {args.kills} SIGKILLs; logs in {workdir}")
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "chaos", workdir)
        outcome = run_chaos(settings, events, args.kills, rate, workdir, args.seed, console.print)
    verdict: Verdict = outcome["verdict"]
    result = {"kills": len(outcome["kills"]), "events": len(events), "users": verdict.users,
              "lost": verdict.lost, "duplicated": verdict.duplicated, "differ": verdict.differ,
              "stale": verdict.stale, "ok": verdict.ok, "seconds": outcome["seconds"], "rate": rate,
              "examples": verdict.examples, "kill_log": outcome["kills"]}
    table = Table(title="chaos: SIGKILL mid-stream, restart on the same state")
    for col in ("kills", "events", "users", "lost", "duplicated", "differ", "stale", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(*(str(result[c]) for c in ("kills", "events", "users", "lost", "duplicated", "differ", "stale",
                                             "seconds")))
    console.print(table)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}" + ("" if verdict.ok else f"; FAILED: {verdict.examples}"))
    return 0 if verdict.ok else 1
