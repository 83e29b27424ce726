"""Continual vs frozen on a drifting stream, through a live broker, worker and learner.

A synthetic stream (model/synthetic.py `drifting_stream`) runs stationary, then drifts:
new items appear among the popular ones, popularity reshuffles and users' interests move.
A checkpoint is trained on the stationary prefix and served twice by one worker, as an
A/B test split by user: variant A from the directory `streamrec learn` publishes into
(continual), variant B from a copy nobody touches (frozen). After the prefix, the stream
is produced at `--rate`; every event is scored against the recommendations the user had
been sent before it (read from the recommendations topic, as any subscriber would), so
both hit rates are what users were shown.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

NEEDS = ("psutil", "matplotlib")  # the [bench] extra, checked before the run starts
EXAMPLES = """examples:
  streamrec bench freshness --json freshness.json --plot freshness.png
  streamrec bench freshness --events 40000 --rate 300 --learn-interval-s 20 --json f.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--prefix", type=int, default=100_000, help="stationary events the checkpoint trains on")
    parser.add_argument("--events", type=int, default=60_000, help="events after the drift, produced at --rate")
    parser.add_argument("--rate", type=float, default=200.0, help="events/s after the prefix")
    parser.add_argument("--drift", type=float, default=0.5, help="shift share (0 = stationary control)")
    parser.add_argument("--new-items", type=float, default=0.1, help="new items, as a share of --items")
    parser.add_argument("--learn-interval-s", type=float, default=20.0)
    parser.add_argument("--learn-update-s", type=float, default=8.0)
    parser.add_argument("--train-minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline", action="store_true", help="no Kafka: the same stream through "
                        "`eval --protocol prequential`'s replay, with the learner's default settings")
    parser.add_argument("--json", type=Path, default=Path("freshness.json"))
    parser.add_argument("--plot", type=Path, default=Path("freshness.png"))


def train_prefix(prefix: list, out: Path, minutes: float, seed: int) -> set[str]:
    """Train the starting checkpoint on the prefix; returns its item vocabulary."""
    import torch

    from model.config import ModelConfig
    from model.data import Dataset
    from model.features import RawEvent
    from model.train import TrainConfig, model_config_for, train
    per_user: dict[str, list] = {}
    for u, i, ts in prefix:
        per_user.setdefault(u, []).append(RawEvent(i, "click", ts))
    items = list(dict.fromkeys(i for _, i, _ in prefix))
    ds = Dataset(list(per_user), list(per_user.values()), items, path="drifting_stream", format="jsonl")
    cfg: ModelConfig = model_config_for(ds)
    train(ds, cfg, TrainConfig(max_minutes=minutes, seed=seed), torch.device("cpu"), str(out))
    return set(items)


def event(n: int, u: str, i: str, ts: float) -> tuple[bytes, bytes]:
    return json.dumps({"event_id": f"e{n}", "user_id": u, "item_id": i, "type": "click", "ts": ts}).encode(), u.encode()


def join(stream: list, recs: list[dict], first: int, known: set[str], k: int = 10) -> list[dict]:
    """Each event from index `first` on, against the user's latest recommendations before it:
    {n, variant, hit, new}. Records carry the event_id they answer; a user's records arrive
    in order, so one pointer per user walks them."""
    pos = {f"e{n}": n for n in range(len(stream))}
    by_user: dict[str, list[tuple[int, dict]]] = {}
    for r in recs:
        n = pos.get(r.get("event_id"))
        if n is not None:
            by_user.setdefault(r["user_id"], []).append((n, r))
    ptr: dict[str, int] = {}
    out = []
    for n in range(first, len(stream)):
        u, item, _ = stream[n]
        lst = by_user.get(u, [])
        j = ptr.get(u, -1)
        while j + 1 < len(lst) and lst[j + 1][0] < n:
            j += 1
        ptr[u] = j
        if j < 0:
            continue
        rec = lst[j][1]
        top = [x["item_id"] for x in rec["items"][:k]]
        out.append({"n": n, "variant": rec["variant"], "hit": item in top, "new": item not in known,
                    "version": rec["model_version"]})
    return out


def rates(rows: list[dict], variant: str, new: bool | None = None) -> float:
    sel = [r["hit"] for r in rows if r["variant"] == variant and (new is None or r["new"] == new)]
    return sum(sel) / len(sel) if sel else 0.0


def cpu_seconds(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from model.synthetic import drifting_stream
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.harness import TopicReader, WorkerProcess, isolated_settings, metric_sum
    from stream_app.testing.replay import BIG_BATCHES
    from stream_app.transport.broker import EmbeddedBroker, free_port

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="streamrec-freshness-"))
    total = args.prefix + args.events
    stream = drifting_stream(args.users, args.items, total, drift_at=args.prefix / total, new_items=args.new_items,
                             shift=args.drift, seed=args.seed)
    console.print(f"freshness: {args.users} users, {args.items} items, {args.prefix} stationary events, then "
                  f"{args.events} drifting at {args.rate:.0f}/s; work dir {work}")
    known = train_prefix(stream[: args.prefix], work / "continual" / "v0", args.train_minutes, args.seed)
    if args.offline:
        return run_offline(args, stream, work / "continual" / "v0", console)
    shutil.copytree(work / "continual" / "v0", work / "frozen" / "v0")
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "fresh", work, model_dir=work / "continual",
                                     model_b_dir=work / "frozen", ab_split=0.5, learn_port=free_port(),
                                     learn_interval_s=args.learn_interval_s, learn_update_s=args.learn_update_s,
                                     learn_every_events=10 * total)
        worker = WorkerProcess(settings, work / "worker.log").start().wait_ready(120)
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic, BIG_BATCHES)
        producer.paced((event(n, *e) for n, e in enumerate(stream[: args.prefix])), rate=None)
        learner = WorkerProcess(settings, work / "learner.log", command="learn").start().wait_metrics(120)
        # a learner that has been running all along: it has read the prefix and updated once
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            m = learner.metrics()
            if m.get("streamrec_learner_events_total", 0) >= args.prefix and \
                    metric_sum(m, "streamrec_learner_updates_total") >= 1:
                break
            time.sleep(1)
        console.print("prefix sent; learner caught up and updated; the drifting stream starts")
        sent_before = producer.sent
        t0, c0 = time.time(), cpu_seconds(learner.proc.pid)
        drifting = (event(n, *stream[n]) for n in range(args.prefix, total))
        feeder = threading.Thread(target=producer.paced, args=(drifting, args.rate), daemon=True)
        feeder.start()
        while feeder.is_alive():
            feeder.join(15)
            m = learner.metrics()
            hr = m.get('streamrec_prequential_hr{model="serving"}', 0.0)
            console.print(f"{time.time() - t0:5.0f}s  sent {producer.sent - sent_before}  learner updates "
                          f"{metric_sum(m, 'streamrec_learner_updates_total'):.0f}  prequential HR@10 serving {hr:.3f}")
        wall = time.time() - t0
        cpu = cpu_seconds(learner.proc.pid) - c0
        deadline = time.monotonic() + 120
        while metric_sum(worker.metrics(), "streamrec_consumer_lag") > 0 and time.monotonic() < deadline:
            time.sleep(1)
        learner.stop()
        reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
        recs = [json.loads(r.value) for r in reader.read_to_end(300) if r.value]
        reader.close()
        producer.close()
        worker.stop()
    logged = [json.loads(line) for line in (settings.state_dir / "learner" / "updates.jsonl").read_text().splitlines()]
    updates = [u for u in logged if u["at"] >= t0]  # those that finished during the drifting stream
    rows = join(stream, recs, args.prefix, known)
    first_served = {}
    for r in recs:
        first_served.setdefault(r["model_version"], r["generated_at"])
    published = [(u["version"], u["at"]) for u in updates if u["published"]]
    swaps = [first_served[v] - at for v, at in published if v in first_served]
    seconds = sorted(u["seconds"] for u in updates)
    result = {
        "frozen_hr": rates(rows, "B"), "continual_hr": rates(rows, "A"),
        "new_item_hr_frozen": rates(rows, "B", True), "new_item_hr_continual": rates(rows, "A", True),
        "updates": len(updates), "published": len(published),
        "update_seconds_p50": seconds[len(seconds) // 2] if seconds else None,
        "update_seconds_max": seconds[-1] if seconds else None,
        "learner_cpu_pct": round(100 * cpu / wall, 1),
        "swap_to_first_served_s": round(max(swaps), 2) if swaps else None,
        "swap_to_first_served_s_p50": round(sorted(swaps)[len(swaps) // 2], 2) if swaps else None,
        "opportunities": {v: sum(r["variant"] == v for r in rows) for v in ("A", "B")},
        "new_item_opportunities": {v: sum(r["variant"] == v and r["new"] for r in rows) for v in ("A", "B")},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "learn_interval_s": args.learn_interval_s,
    }
    result["hr_ratio"] = result["continual_hr"] / result["frozen_hr"] if result["frozen_hr"] else None
    args.json.write_text(json.dumps({**result, "update_log": updates}, indent=2) + "\n")
    plot(rows, args.rate, args.prefix, [at - t0 for _, at in published], args.plot)
    print_table(console, result)
    console.print(f"wrote {args.json} and {args.plot}")
    return 0


def run_offline(args: argparse.Namespace, stream: list, ckpt: Path, console) -> int:
    """Frozen vs continual test-then-train on the same stream, on the events' own clock."""
    from model import checkpoint
    from model.config import LearnConfig
    from model.evaluate import worker_seen_policy
    from model.features import RawEvent
    from model.prequential import replay
    model, _ = checkpoint.load(str(ckpt))
    events = [(u, RawEvent(i, "click", ts)) for u, i, ts in stream]
    res = replay(events, model, LearnConfig(), stream[args.prefix][2], True, worker_seen_policy(), progress=True)
    result = {"mode": "offline", "frozen_hr": res["frozen"]["hr"], "continual_hr": res["hr"],
              "new_item_hr_frozen": res["frozen"]["new_item"]["hr"], "new_item_hr_continual": res["new_item"]["hr"],
              "cooccurrence_hr": res["cooccurrence"]["hr"], "popularity_hr": res["popularity"]["hr"],
              "updates": res["updates"], "published": res["published"],
              "update_seconds_p50": res["update_seconds_p50"], "learner_cpu_pct": None,
              "swap_to_first_served_s": None, "swap_to_first_served_s_p50": None, "prequential": res,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if not k.startswith("_")}}
    result["hr_ratio"] = result["continual_hr"] / result["frozen_hr"] if result["frozen_hr"] else None
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, result)
    console.print(f"wrote {args.json}")
    return 0


def print_table(console, r: dict) -> None:
    from rich.table import Table
    t = Table(title="freshness offline: prequential HR@10, continual vs frozen" if r.get("mode") == "offline"
              else "freshness: continual (A) vs frozen (B), HR@10 of what users were shown")
    for col in ("", "frozen", "continual", "ratio"):
        t.add_column(col, justify="right")
    for name, a, b in (("all items", "frozen_hr", "continual_hr"),
                       ("new items", "new_item_hr_frozen", "new_item_hr_continual")):
        ratio = r[b] / r[a] if r[a] else float("inf")
        t.add_row(name, f"{r[a]:.4f}", f"{r[b]:.4f}", f"{ratio:.2f}x")
    console.print(t)
    if "cooccurrence_hr" in r:
        console.print(f"online baselines on the same events, HR@10: co-occurrence {r['cooccurrence_hr']:.4f}, "
                      f"popularity {r['popularity_hr']:.4f}")
    console.print(f"updates {r['updates']} ({r['published']} published), p50 {r['update_seconds_p50'] or 0:.2f} s")
    if r.get("mode") != "offline":
        console.print(f"update max {r['update_seconds_max']} s; learner CPU {r['learner_cpu_pct']}% of one core; "
                      f"publish -> first served p50 {r['swap_to_first_served_s_p50']} s, max "
                      f"{r['swap_to_first_served_s']} s")


def plot(rows: list[dict], rate: float, first: int, publishes: list[float], path: Path, window: int = 2000) -> None:
    """Rolling HR@10 of each variant over stream time (event n is sent (n - first) / rate
    seconds in, by the pacer), publishes marked (seconds in)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(8, 4))
    for variant, label, color in (("A", "continual", "tab:blue"), ("B", "frozen", "tab:gray")):
        sel = [r for r in rows if r["variant"] == variant]
        if len(sel) < 10:
            continue
        w = min(window // 2, len(sel))
        hits = np.convolve([float(r["hit"]) for r in sel], np.ones(w) / w, mode="valid")
        x = [(r["n"] - first) / rate for r in sel][w - 1:]
        ax.plot(x, hits, color=color, label=f"{label} (rolling {w} events)")
    for i, at in enumerate(publishes):
        ax.axvline(at, color="tab:green", lw=0.6, alpha=0.6, label="learner publish" if i == 0 else None)
    ax.set_xlabel("seconds into the drifting stream")
    ax.set_ylabel("HR@10 of the lists users were shown")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
