"""Recommendation quality on a dataset, as a user would measure it: `streamrec train` with
its defaults, then the held-out test split under both protocols (sampled-100 and full
ranking), beside popularity and co-occurrence measured in the same run. Model selection
and every default are judged on the validation split; test is reported.

`--live` also replays the test users' histories through a live broker and worker serving
the trained checkpoint and scores the recommendations topic: the live number should
match the offline full protocol under the same seen-items policy.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

EXAMPLES = """examples:
  streamrec bench quality --data beauty.pairs.gz --json quality_beauty.json --plot quality_beauty.png
  streamrec bench quality --data events.jsonl --catalog catalog.jsonl --live --live-users 3000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from model.train import TrainConfig

    parser.add_argument("--data", required=True, help="JSONL events or `user item` pairs (.gz is fine)")
    parser.add_argument("--format", default="auto", choices=("auto", "jsonl", "pairs"))
    parser.add_argument("--catalog", default=None, help="JSONL catalog rows (content embeddings)")
    parser.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes,
                        help="training wall budget (default: the train default)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--live", action="store_true", help="also replay the test users through a live worker")
    parser.add_argument("--live-users", type=int, default=5000, help="test users replayed live (sampled, seeded)")
    parser.add_argument("--out", type=Path, default=None, help="keep the trained checkpoint here")
    parser.add_argument("--json", type=Path, default=Path("quality.json"))
    parser.add_argument("--plot", type=Path, default=Path("quality.png"), help="training curve")


def offline(ds, score, splits: dict, k: int, policy: tuple[str, int]) -> dict:
    """The model's `score` and the baselines on each split under both protocols."""
    from model.evaluate import baseline_fit_data, baseline_scorer, evaluate

    out: dict = {}
    for split_name, sp in splits.items():
        scorers = {"model": score}
        for name in ("popularity", "cooccurrence"):
            scorers[name] = baseline_scorer(name, baseline_fit_data(ds, sp), ds.items)
        for who, score in scorers.items():
            for protocol in ("sampled", "full"):
                out.setdefault(split_name, {}).setdefault(who, {})[protocol] = evaluate(
                    score, sp, ds.items, protocol, k, seed=0, seen_policy=policy)
    return out


def seen_policies(ds, score, valid: list, k: int) -> dict:
    """The model's full-ranking validation metrics under each seen-items policy: how the
    worker's default is chosen (held-out data, never test)."""
    from model.evaluate import evaluate
    from model.seen import POLICIES

    return {policy: evaluate(score, valid, ds.items, "full", k, seen_policy=(policy, 0)) for policy in POLICIES}


def live(ckpt: Path, ds, test: list, k: int, users: int, policy: tuple[str, int], say) -> dict:
    """Replay up to `users` test users through a live worker; live vs offline on those users."""
    import random

    from model import checkpoint
    from model.evaluate import evaluate, model_scorer
    from stream_app.testing.harness import WorkerProcess, isolated_settings
    from stream_app.testing.replay import replay, score_lists
    from stream_app.transport.broker import EmbeddedBroker

    chosen = test if len(test) <= users else random.Random(0).sample(test, users)
    longest = max(len(s.context) for s in chosen)
    model, _ = checkpoint.load(str(ckpt), "cpu")
    offline_full = evaluate(model_scorer(model, ds.items, ds.catalog), chosen, ds.items, "full", k, seen_policy=policy)
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-quality-"))
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "quality", workdir, model_dir=ckpt, top_k=k,
                                     exclude_seen=policy[0], exclude_seen_window=policy[1],
                                     history_max=min(10_000, max(200, longest + 1)))
        worker = WorkerProcess(settings, workdir / "worker.log").start().wait_ready(120)
        try:
            t0 = time.monotonic()
            published = replay(settings, chosen, say=say)
            seconds = time.monotonic() - t0
        finally:
            worker.stop()
    events = sum(len(s.context) for s in chosen)
    return {"live": score_lists(chosen, published, k), "offline_full": offline_full,
            "events": events, "seconds": round(seconds, 1), "events_per_s": round(events / seconds, 1)}


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from model.cache import pick_device
    from model.data import leave_one_out, load
    from model.evaluate import model_scorer, worker_seen_policy
    from model.train import TrainConfig, model_config_for, plot_curve, train

    console = Console()
    ds = load(args.data, args.format, args.catalog)
    base = TrainConfig()
    tc = TrainConfig(**{**asdict(base), "max_minutes": args.max_minutes})
    mc = model_config_for(ds)
    out = args.out or Path(tempfile.mkdtemp(prefix="streamrec-quality-")) / "model"
    t0 = time.monotonic()
    model, info = train(ds, mc, tc, pick_device(args.device), str(out))
    train_s = time.monotonic() - t0
    _, valid, test = leave_one_out(ds)
    policy = worker_seen_policy()
    with torch.no_grad():
        score = model_scorer(model, ds.items, ds.catalog)
        metrics = offline(ds, score, {"valid": valid, "test": test}, args.k, policy)
        metrics["seen_policies_valid"] = seen_policies(ds, score, valid, args.k)
    result = {"data": str(args.data), "fingerprint": ds.fingerprint, "users": len(ds.users),
              "items": len(ds.items), "interactions": ds.n_interactions, "exclude_seen": list(policy),
              "train": {"wall_s": round(train_s, 1), "epochs": len(info["history"]),
                        "best_epoch": info["best"]["epoch"], "stop_reason": info["stop_reason"],
                        "loss": info["loss"], "model_config": mc.to_dict(), "train_config": asdict(tc),
                        "history": info["history"]},
              **metrics}
    if args.live:
        result["live"] = live(out, ds, test, args.k, args.live_users, policy, console.print)
    _print(console, result, args.k)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(info["history"], str(args.plot))
    console.print(f"results written to {args.json}, training curve to {args.plot}")
    return 0


def _print(console, result: dict, k: int) -> None:
    from rich.table import Table

    table = Table(title=f"quality · {Path(result['data']).name} · train {result['train']['wall_s']} s, "
                        f"{result['train']['epochs']} epochs (best {result['train']['best_epoch']})")
    for col in ("split", "who", f"sampled HR@{k}", f"sampled NDCG@{k}", f"full HR@{k}", f"full NDCG@{k}"):
        table.add_column(col, justify="right")
    for split in ("valid", "test"):
        for who, m in result[split].items():
            table.add_row(split, who, *(f"{m[p][key]:.4f}" for p in ("sampled", "full") for key in ("hr", "ndcg")))
    console.print(table)
    console.print("seen-items policy, model, full ranking on valid: " + ", ".join(
        f"{policy} HR@{k} {m['hr']:.4f} NDCG@{k} {m['ndcg']:.4f}" for policy, m in result["seen_policies_valid"].items()))
    if "live" in result:
        lv, off = result["live"]["live"], result["live"]["offline_full"]
        console.print(f"live ({lv['answered']}/{lv['users']} users answered, {result['live']['events_per_s']} "
                      f"events/s): HR@{k} {lv['hr']:.4f} NDCG@{k} {lv['ndcg']:.4f} · offline full on the same "
                      f"users: HR@{k} {off['hr']:.4f} NDCG@{k} {off['ndcg']:.4f}")
