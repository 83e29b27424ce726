"""Recommendation quality on a dataset, as a user would measure it: `streamrec train` with
its defaults, then validation and test under both protocols (sampled-100 and full
ranking): the served hybrid, each of its terms alone (transformer, transition), and
popularity and co-occurrence, every one fitted on exactly the transformer's training
data, beside the best published numbers on the same file. Model selection and every
default are judged on the validation split; test is reported.

`--live` also replays the test users' histories through a live broker and worker serving
the trained checkpoint and scores the recommendations topic: the live number should
match the offline full protocol under the same seen-items policy.

The surfaces and rules are measured too (stream_app/bench/surfaces_quality.py): similar
items ("next item given the last one") against co-occurrence, and the published list's
HR/NDCG under each rule set, with every list checked for violations.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Best published full-ranking leave-one-out HR@10 / NDCG@10 on these exact files (the
# S3-Rec/ICLRec preprocessing of Amazon 5-core), by data fingerprint.
PUBLISHED = {
    "sha256:60a37cfa754afedf": {"TV-Rec (NeurIPS'25)": (0.1017, 0.0608), "BSARec (AAAI'24)": (0.1008, 0.0611),
                                "eSASRec": (0.0928, 0.0523), "ICLRec": (0.0744, 0.0403)},
    "sha256:079d92e1991c6c34": {"TV-Rec (NeurIPS'25)": (0.0635, 0.0363), "eSASRec": (0.0560, 0.0323),
                                "ICLRec": (0.0437, 0.0238)},
}
WHO = {"hybrid": "served", "transformer": "transformer", "transition": "transition"}

NEEDS = ("matplotlib",)  # the [bench] extra, checked before the run starts
EXAMPLES = """examples:
  streamrec bench quality --data beauty.pairs.gz --json quality_beauty.json --plot quality_beauty.png
  streamrec bench quality --data beauty.pairs.gz --checkpoint runs/beauty   # score a trained run, no training
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
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="score this `streamrec train --data` run of the same file instead of training")
    parser.add_argument("--json", type=Path, default=Path("quality.json"))
    parser.add_argument("--plot", type=Path, default=Path("quality.png"), help="training curve")


def offline(ds, model, splits: dict, k: int, policy: tuple[str, int]) -> dict:
    """The hybrid, its two terms and the baselines on each split under both protocols; the
    baselines are fitted on the transformer's training histories (model/evaluate.py)."""
    from model.evaluate import baseline_fit_data, baseline_scorer, evaluate, model_scorer

    fit = baseline_fit_data(ds)
    scorers = {who: model_scorer(model, ds.items, ds.catalog, part) for who, part in WHO.items()}
    scorers.update({name: baseline_scorer(name, fit, ds.items) for name in ("cooccurrence", "popularity")})
    out: dict = {}
    for split_name, sp in splits.items():
        for who, score in scorers.items():
            for protocol in ("sampled", "full"):
                out.setdefault(split_name, {}).setdefault(who, {})[protocol] = evaluate(
                    score, sp, ds.items, protocol, k, seed=0, seen_policy=policy)
    return out


def winner(result: dict, split: str, metric: str = "ndcg") -> str:
    """Who ranks best on a split under full ranking."""
    rows = result[split]
    return max(rows, key=lambda who: rows[who]["full"][metric])


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

    from model import checkpoint
    from model.cache import pick_device
    from model.data import leave_one_out, load
    from model.evaluate import FITTED_ON, model_scorer, worker_seen_policy
    from model.train import TrainConfig, model_config_for, train
    from stream_app.errors import UserError

    console = Console()
    ds = load(args.data, args.format, args.catalog)
    t0 = time.monotonic()
    if args.checkpoint:
        model, meta = checkpoint.load(str(args.checkpoint), pick_device(args.device))
        if meta.get("data", {}).get("fingerprint") != ds.fingerprint:
            raise UserError(f"{args.checkpoint} was not trained on {args.data}; pass the run of this file or drop "
                            "--checkpoint to train one")
        info, out = meta["training"], args.checkpoint
    else:
        tc = TrainConfig(**{**asdict(TrainConfig()), "max_minutes": args.max_minutes})
        out = args.out or Path(tempfile.mkdtemp(prefix="streamrec-quality-")) / "model"
        model, info = train(ds, model_config_for(ds), tc, pick_device(args.device), str(out))
    train_s = info.get("train_seconds", round(time.monotonic() - t0, 1))
    _, valid, test = leave_one_out(ds)
    policy = worker_seen_policy()
    with torch.no_grad():
        metrics = offline(ds, model, {"valid": valid, "test": test}, args.k, policy)
        metrics["seen_policies_valid"] = seen_policies(ds, model_scorer(model, ds.items, ds.catalog), valid, args.k)
    result = {"data": str(args.data), "fingerprint": ds.fingerprint, "users": len(ds.users),
              "items": len(ds.items), "interactions": ds.n_interactions, "exclude_seen": list(policy),
              "fitted_on": FITTED_ON, "published": PUBLISHED.get(ds.fingerprint, {}),
              "hybrid": {"weight": model.cfg.trans_weight, "eps": model.cfg.trans_eps,
                         "window": model.cfg.trans_window, "entries": model.transition.entries},
              "train": {"wall_s": train_s, "epochs": len(info["history"]),
                        "best_epoch": info["best"]["epoch"], "stop_reason": info["stop_reason"],
                        "loss": info["loss"], "model_config": model.cfg.to_dict(),
                        "train_config": info["train_config"], "history": info["history"],
                        "hybrid_search": info.get("hybrid")},
              **metrics}
    result["winner"] = {split: winner(result, split) for split in ("valid", "test")}
    from stream_app.bench.surfaces_quality import rules_quality, similar_quality
    from stream_app.config import Settings
    with torch.no_grad():
        result["similar"] = similar_quality(ds, model, test, args.k)
        result["rules"] = rules_quality(ds, model, test, args.k, Settings.model_fields["rules_pool"].default, policy,
                                        say=lambda m: console.print(f"[dim]{m}[/dim]"))
    if args.live:
        result["live"] = live(Path(out), ds, test, args.k, args.live_users, policy, console.print)
    _print(console, result, args.k)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, info["history"], args.plot, args.k)
    console.print(f"results written to {args.json}, plot to {args.plot}")
    return 0


def plot(result: dict, history: list[dict], path: Path, k: int) -> None:
    """Training curve beside a bar chart of full-ranking test NDCG@k: who wins, at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    ep = [r["epoch"] for r in history]
    ax.plot(ep, [r["val_ndcg"] for r in history], "r-s", ms=3, label="transformer val NDCG@10")
    ax.set_xlabel("epoch"); ax.set_ylabel("validation NDCG@10"); ax.legend(fontsize=8)
    rows = [(who, m["full"]["ndcg"]) for who, m in result["test"].items()]
    rows += [(f"{name} (published)", v[1]) for name, v in result["published"].items()]
    names, vals = zip(*rows)
    colors = ["tab:red" if n == "hybrid" else "tab:gray" if "published" in n else "tab:blue" for n in names]
    bx.barh(names, vals, color=colors)
    bx.invert_yaxis()
    bx.set_xlabel(f"test NDCG@{k}, full ranking")
    fig.suptitle(Path(result["data"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print(console, result: dict, k: int) -> None:
    from rich.table import Table

    table = Table(title=f"quality · {Path(result['data']).name} · train {result['train']['wall_s']} s, "
                        f"{result['train']['epochs']} epochs (best {result['train']['best_epoch']})")
    for col in ("split", "who", f"sampled HR@{k}", f"sampled NDCG@{k}", f"full HR@{k}", f"full NDCG@{k}"):
        table.add_column(col, justify="right")
    for split in ("valid", "test"):
        for who, m in result[split].items():
            table.add_row(split, who, *(f"{m[p][key]:.4f}" for p in ("sampled", "full") for key in ("hr", "ndcg")))
    for name, (hr, ndcg) in result["published"].items():
        table.add_row("test", f"{name} (published)", "", "", f"{hr:.4f}", f"{ndcg:.4f}")
    console.print(table)
    h = result["hybrid"]
    console.print(f"every model and baseline fitted on {result['fitted_on']}; hybrid weight {h['weight']:g}, "
                  f"eps {h['eps']:g} (chosen on validation); best by full NDCG@{k}: valid "
                  f"{result['winner']['valid']}, test {result['winner']['test']}")
    console.print("seen-items policy, model, full ranking on valid: " + ", ".join(
        f"{policy} HR@{k} {m['hr']:.4f} NDCG@{k} {m['ndcg']:.4f}" for policy, m in result["seen_policies_valid"].items()))
    _print_surfaces(console, result, k)
    if "live" in result:
        lv, off = result["live"]["live"], result["live"]["offline_full"]
        console.print(f"live ({lv['answered']}/{lv['users']} users answered, {result['live']['events_per_s']} "
                      f"events/s): HR@{k} {lv['hr']:.4f} NDCG@{k} {lv['ndcg']:.4f} · offline full on the same "
                      f"users: HR@{k} {off['hr']:.4f} NDCG@{k} {off['ndcg']:.4f}")


def _print_surfaces(console, result: dict, k: int) -> None:
    from rich.table import Table

    sim = Table(title="similar items: next item given the last one, test, full ranking")
    for col in ("who", f"HR@{k}", f"NDCG@{k}"):
        sim.add_column(col, justify="right")
    for who, m in result["similar"].items():
        sim.add_row(who, f"{m['hr']:.4f}", f"{m['ndcg']:.4f}")
    console.print(sim)
    rules = result["rules"]
    table = Table(title=f"rules on the published list, test (best {rules['pool']} candidates, then the rules)")
    for col in ("rules", f"HR@{k}", f"NDCG@{k}", "vs none", "short lists", "violations"):
        table.add_column(col, justify="right")
    none = rules["rows"]["none"]["ndcg"] or 1.0
    for name, m in rules["rows"].items():
        table.add_row(name, f"{m['hr']:.4f}", f"{m['ndcg']:.4f}", f"{m['ndcg'] / none - 1:+.1%}",
                      str(m["short_lists"]), str(m["violations"]))
    console.print(table)
    console.print(f"stand-in catalog: {rules['catalog']}")
