"""Train the sequential transformer recommender (leave-one-out, early stopping on NDCG@10).

Defaults were sized on a synthetic file of the Amazon Video Games shape (31k users, 24k
items, 287k interactions) on 2 CPU threads; see docs/model.md "Training defaults and why". Full-softmax
cross-entropy over all items (not BCE with one negative) is what makes SASRec converge in
few epochs; sampled softmax with logQ correction is there for catalogs too big for it.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.config import ModelConfig
from model.data import Dataset, leave_one_out, load
from model.event_types import positive
from model.features import Batch, ItemIndex, RawEvent, encode
from model.loss import item_loss
from model.transformer import SeqRec

EXAMPLES = """examples:
  streamrec train --data games.txt --format pairs --out runs/games
  streamrec train --data events.jsonl --catalog catalog.jsonl --out runs/shop --device cuda
  streamrec train --data big.txt --format pairs --loss sampled --negatives 8192 --out runs/big
"""
FULL_SOFTMAX_MAX_ITEMS = 200_000


@dataclass
class TrainConfig:
    epochs: int = 60            # cap; early stopping and the time budget usually end sooner
    patience: int = 10          # epochs without a validation NDCG@10 gain (the published recipes: 10)
    batch_size: int = 128       # sequences per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    seq_len: int = 50           # training chunk length (histories are cut into chunks from the end)
    loss: str = "auto"          # auto | full | sampled
    negatives: int = 4096       # sampled softmax only
    seed: int = 0
    max_minutes: float = 20.0   # wall budget (the hybrid search included): no epoch starts that would not finish in it
    valid_users: int = 10_000   # validation subset per epoch (fixed, seeded)
    select: str = "full"        # checkpoint selection: validation NDCG@10 by full ranking or sampled-100
    schedule: str = "cosine"    # constant | cosine: lr decays over the run, measured by time or epochs
    ce_dtype: str = "auto"      # matmuls of the full-softmax loss: auto (bf16 where fast) | fp32 | bf16
    transition_neighbors: int = 100  # hybrid score: successors kept per item (0 = the transformer alone)


def training_tensors(train: list[list[RawEvent]], items: ItemIndex, seq_len: int):
    """Cut histories into chunks of <= seq_len events from the end; target of each position
    is the next event's item (0 = no target: next is a search or a dismiss, or end of train
    history). A dismiss is still an input, with its own type embedding."""
    chunks, targets = [], []
    for h in train:
        tgt = [items.lookup(h[j + 1].item_id) if j + 1 < len(h) and positive(h[j + 1].item_id, h[j + 1].type) else 0
               for j in range(len(h))]
        if not any(tgt):
            continue
        e = len(h)
        while e > 0:
            s = max(0, e - seq_len)
            if any(tgt[s:e]):
                chunks.append(h[:e])
                targets.append(tgt[s:e])
            e = s
    b = encode(chunks, items, seq_len)
    T = b.valid.shape[1]
    y = torch.zeros(len(chunks), T, dtype=torch.long)
    for r, t in enumerate(targets):
        y[r, T - len(t):] = torch.tensor(t)
    return b, y


def lr_scale(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at `progress` (0..1) of the run. Cosine warms up over the
    first 3% and decays to 5%; progress is the larger of time and epochs used, so the
    decay ends with the wall budget whichever ends the run."""
    if schedule == "constant":
        return 1.0
    if progress < 0.03:
        return (progress + 1e-3) / 0.03
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def length_batches(lengths: torch.Tensor, bs: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches of similar length (sorted within shuffled pools) to cut padding."""
    perm = torch.randperm(len(lengths), generator=gen)
    out = []
    pool = 50 * bs
    for lo in range(0, len(perm), pool):
        p = perm[lo: lo + pool]
        p = p[torch.argsort(lengths[p], stable=True)]
        out += list(torch.split(p, bs))
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in order]


def batch_rows(b_all: Batch, y_all: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor,
               device: torch.device) -> tuple[Batch, torch.Tensor]:
    """Rows `idx` of the training tensors, trimmed to their longest sequence, on `device`."""
    T = int(lengths[idx].max())
    b = Batch(*(getattr(b_all, f)[idx, -T:] if f != "qtok" else b_all.qtok
                for f in ("item", "etype", "gap", "qidx", "qtok", "valid"))).to(device)
    return b, y_all[idx, -T:].to(device)


def train(ds: Dataset, mc: ModelConfig, tc: TrainConfig, device: torch.device, out_dir: str | None = None,
          quiet: bool = False) -> tuple[SeqRec, dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model.evaluate import evaluate, model_scorer, sample_negatives
    t_start = time.time()
    console = Console(quiet=quiet)
    random.seed(tc.seed); np.random.seed(tc.seed); torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    train_h, valid, _ = leave_one_out(ds)
    if not valid:
        from stream_app.errors import UserError
        raise UserError(f"{ds.path}: no user has >= 3 item interactions, so there is nothing to validate on")
    items = ItemIndex(ds.items, mc, ds.catalog)
    model = SeqRec(mc, items).to(device)
    b_all, y_all = training_tensors(train_h, items, tc.seq_len)
    lengths = b_all.valid.sum(1)
    loss_kind = tc.loss if tc.loss != "auto" else ("full" if len(items) <= FULL_SOFTMAX_MAX_ITEMS else "sampled")
    logq = None
    if loss_kind == "sampled":
        cnt = torch.bincount(y_all[y_all > 0], minlength=len(items)).float() + 1.0
        cnt[0] = 0.0
        logq = (cnt / cnt.sum()).clamp_min(1e-30).log().to(device)
    vrng = random.Random(tc.seed)
    vsplits = valid if len(valid) <= tc.valid_users else vrng.sample(valid, tc.valid_users)
    vnegs = sample_negatives(vsplits, {iid: i for i, iid in enumerate(ds.items)}, 100, tc.seed)
    if tc.select not in ("full", "sampled") or tc.schedule not in ("constant", "cosine"):
        from stream_app.errors import UserError
        raise UserError(f"--select takes full or sampled, --schedule constant or cosine (got {tc.select!r}, "
                        f"{tc.schedule!r})")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    history: list[dict] = []
    best, best_state, bad, epoch_times = -1.0, None, 0, []
    blend_trials, eval_seconds = 4 + len(BLEND_EPS) * len(BLEND_WEIGHTS), 0.0  # the hybrid's search, inside the budget
    n_targets = int((y_all > 0).sum())
    console.print(f"[bold]train[/] {ds.path}: {len(ds.users)} users, {len(items) - 1} items, "
                  f"{n_targets} train targets in {len(lengths)} chunks, {len(valid)} validation users "
                  f"(scoring {len(vsplits)}), loss={loss_kind}, device={device}, threads={torch.get_num_threads()}")
    cols = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val NDCG@10 {task.fields[ndcg]:.4f} HR@10 {task.fields[hr]:.4f}"),
            TimeElapsedColumn()]
    stop_reason = "epochs"
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task("epoch", total=tc.epochs, loss=float("nan"), ndcg=0.0, hr=0.0)
        for epoch in range(1, tc.epochs + 1):
            elapsed = time.time() - t_start
            reserve = blend_trials * eval_seconds if tc.transition_neighbors > 0 else 0.0
            if epoch_times and elapsed + 1.1 * max(epoch_times[-3:]) + reserve > tc.max_minutes * 60:
                stop_reason = "time budget"
                break
            t0, c0 = time.time(), time.process_time()
            model.train()
            tot, nb = 0.0, 0
            batches = length_batches(lengths, tc.batch_size, gen)
            for bi, idx in enumerate(batches):
                progress = max((time.time() - t_start) / (tc.max_minutes * 60), (epoch - 1 + bi / len(batches)) / tc.epochs)
                for group in opt.param_groups:
                    group["lr"] = tc.lr * lr_scale(tc.schedule, progress)
                b, y = batch_rows(b_all, y_all, idx, lengths, device)
                h = model(b)
                m = y > 0
                loss = item_loss(model, h[m], y[m], tc, logq)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item(); nb += 1
                if bi % 20 == 0:
                    prog.update(task, description=f"epoch {epoch} {bi}/{len(batches)}", loss=tot / nb)
            model.eval()
            t_eval = time.time()
            met = evaluate(model_scorer(model, ds.items), vsplits, ds.items, tc.select, 10, tc.seed, negatives=vnegs)
            eval_seconds = time.time() - t_eval
            epoch_times.append(time.time() - t0)
            rec = {"epoch": epoch, "loss": tot / max(nb, 1), "val_hr": met["hr"], "val_ndcg": met["ndcg"],
                   "val_mrr": met["mrr"], "seconds": round(epoch_times[-1], 2),
                   "cpu_seconds": round(time.process_time() - c0, 2)}
            history.append(rec)
            prog.update(task, advance=1, description=f"epoch {epoch}", loss=rec["loss"], ndcg=met["ndcg"], hr=met["hr"])
            console.print(f"epoch {epoch:3d}  loss {rec['loss']:.4f}  val HR@10 {met['hr']:.4f}  "
                          f"NDCG@10 {met['ndcg']:.4f}  {rec['seconds']:.1f}s")
            if met["ndcg"] > best:
                best, bad = met["ndcg"], 0
                best_state = copy.deepcopy(model.state_dict())
                best_rec = rec
            else:
                bad += 1
                if bad >= tc.patience:
                    stop_reason = "early stopping"
                    break
    model.load_state_dict(best_state)
    model.eval()
    hybrid = None
    if tc.transition_neighbors > 0:
        hybrid = fit_hybrid(model, train_h, vsplits, ds.items, tc, console.print, vnegs)
        best_rec = {**best_rec, **{k: hybrid["chosen"][k] for k in ("val_hr", "val_ndcg", "val_mrr")}}
    info = {"history": history, "best": best_rec, "stop_reason": stop_reason, "loss": loss_kind,
            "hybrid": hybrid, "train_seconds": round(time.time() - t_start, 1), "train_config": asdict(tc)}
    console.print(f"best epoch {best_rec['epoch']}: val HR@10 {best_rec['val_hr']:.4f} NDCG@10 "
                  f"{best_rec['val_ndcg']:.4f}; stopped by {stop_reason} after {info['train_seconds']}s")
    if out_dir:
        save_run(out_dir, model, ds, info)
    return model, info


BLEND_EPS = (0.001, 0.01, 0.1)
BLEND_WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0)
TRANSITION_FIRST = 1000.0  # the weight at which the transformer only breaks the transition term's ties


def fit_hybrid(model: SeqRec, train_h: list[list[RawEvent]], splits: list, item_ids: list[str], tc: TrainConfig,
               say, negatives: np.ndarray | None = None) -> dict:
    """Give `model` its transition table (from exactly the histories it trained on) and the
    blend weight and eps that maximise validation NDCG@10 under the selection protocol; weight 0
    (the transformer alone) is on the grid, so the hybrid never scores below it on validation
    (docs/model.md, "Hybrid score")."""
    from dataclasses import replace

    from model.evaluate import evaluate, model_scorer
    from model.features import item_ids as item_ids_of
    from model.transition import Transition
    t0 = time.time()
    seqs = [[model.items.lookup(i) for i in item_ids_of(h)] for h in train_h]
    model.transition = Transition.fit(seqs, model.cfg.n_items + 1, tc.transition_neighbors,
                                      model.cfg.trans_window).to(model.device)
    base = model.cfg
    tried: list[dict] = []
    memo: dict = {}  # the transformer's user vectors, computed once for every trial

    def trial(weight: float, eps: float) -> float:
        model.cfg = replace(base, trans_weight=weight, trans_eps=eps)
        met = evaluate(model_scorer(model, item_ids, memo=memo), splits, item_ids, tc.select, 10, tc.seed,
                       negatives=negatives)
        tried.append({"weight": weight, "eps": eps, "val_hr": met["hr"], "val_ndcg": met["ndcg"], "val_mrr": met["mrr"]})
        return met["ndcg"]

    trial(0.0, base.trans_eps)
    for eps in BLEND_EPS:
        for w in BLEND_WEIGHTS:
            trial(w, eps)
    best = max(tried, key=lambda r: r["val_ndcg"])
    trial(TRANSITION_FIRST, best["eps"])
    best = max(tried, key=lambda r: r["val_ndcg"])
    if 0 < best["weight"] < TRANSITION_FIRST:  # refine the weight around the best point
        for f in (0.7, 1.4):
            trial(best["weight"] * f, best["eps"])
        best = max(tried, key=lambda r: r["val_ndcg"])
    model.cfg = replace(base, trans_weight=best["weight"], trans_eps=best["eps"])
    say(f"hybrid: transition table {model.transition.entries} entries; weight {best['weight']:g}, eps "
        f"{best['eps']:g}: val HR@10 {best['val_hr']:.4f} NDCG@10 {best['val_ndcg']:.4f} (transformer alone "
        f"{tried[0]['val_hr']:.4f} / {tried[0]['val_ndcg']:.4f}); {time.time() - t0:.0f}s")
    return {"chosen": best, "transformer": tried[0], "grid": tried, "entries": model.transition.entries,
            "seconds": round(time.time() - t0, 1)}


def save_run(out_dir: str, model: SeqRec, ds: Dataset, info: dict) -> str:
    from model import checkpoint
    meta = {"data": {"path": os.path.abspath(ds.path), "format": ds.format, "fingerprint": ds.fingerprint,
                     "users": len(ds.users), "interactions": ds.n_interactions},
            "validation": {"hr@10": info["best"]["val_hr"], "ndcg@10": info["best"]["val_ndcg"],
                           "mrr": info["best"]["val_mrr"], "epoch": info["best"]["epoch"],
                           "protocol": info["train_config"]["select"]},
            "training": info}
    version = checkpoint.save(out_dir, model, meta)
    plot_curve(info["history"], os.path.join(out_dir, "training_curve.png"))
    return version


def plot_curve(history: list[dict], path: str) -> bool:
    """The curve as a PNG beside the checkpoint, where matplotlib is installed (the [bench]
    extra). The numbers are in checkpoint.json either way, so a core install (the Docker
    image's trainer) skips the picture with one line rather than failing a finished run."""
    from stream_app.errors import UserError, optional
    try:
        optional("matplotlib", "bench", "the training curve").use("Agg")
        plt = optional("matplotlib.pyplot", "bench", "the training curve")
    except UserError as exc:
        print(f"{os.path.basename(path)} not written: {exc}", file=sys.stderr)
        return False
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ep, [r["loss"] for r in history], "b-o", ms=3, label="train loss")
    ax.set_xlabel("epoch"); ax.set_ylabel("train loss", color="b")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["val_ndcg"] for r in history], "r-s", ms=3, label="val NDCG@10")
    ax2.plot(ep, [r["val_hr"] for r in history], "g-^", ms=3, label="val HR@10")
    ax2.set_ylabel("validation")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, m = TrainConfig(), ModelConfig()
    parser.add_argument("--data", required=True, metavar="PATH", help="JSONL events or `user item` pairs file")
    parser.add_argument("--format", default="auto", choices=("auto", "jsonl", "pairs"))
    parser.add_argument("--catalog", metavar="FILE", help="JSONL catalog rows {item_id,title,category} (content embeddings)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=m.dim)
    g.add_argument("--layers", type=int, default=m.n_layers)
    g.add_argument("--heads", type=int, default=m.n_heads)
    g.add_argument("--window", type=int, default=m.window, help="band-attention width W (train and serve)")
    g.add_argument("--dropout", type=float, default=m.dropout)
    t = parser.add_argument_group("optimisation")
    for name, typ in (("epochs", int), ("patience", int), ("batch_size", int), ("lr", float), ("weight_decay", float),
                      ("seq_len", int), ("negatives", int), ("seed", int), ("max_minutes", float),
                      ("valid_users", int), ("transition_neighbors", int)):
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name))
    t.add_argument("--ce-dtype", default=d.ce_dtype, choices=("auto", "fp32", "bf16"),
                   help="dtype of the full-softmax loss matmuls (auto: bf16 where the hardware makes it fast)")
    t.add_argument("--select", default=d.select, choices=("full", "sampled"),
                   help="checkpoint selection by validation NDCG@10: full ranking or sampled-100")
    t.add_argument("--schedule", default=d.schedule, choices=("constant", "cosine"),
                   help="learning rate: constant, or warm-up then cosine decay over the budget")
    t.add_argument("--loss", default=d.loss, choices=("auto", "full", "sampled"),
                   help=f"auto = full softmax up to {FULL_SOFTMAX_MAX_ITEMS} items, else sampled softmax with logQ")


def model_config_for(ds: Dataset, dim: int = ModelConfig.dim, layers: int = ModelConfig.n_layers,
                     heads: int = ModelConfig.n_heads, window: int = ModelConfig.window,
                     dropout: float = ModelConfig.dropout) -> ModelConfig:
    """Hash tables are sized only when the data has content/queries: no dead weight otherwise.
    Data without timestamps gets one gap bucket, so the model ignores the times a live
    stream carries and serves exactly what it was trained on."""
    has_q = any(e.type == "search" for h in ds.histories for e in h)
    has_ts = any(e.ts for h in ds.histories for e in h)
    base = ModelConfig()
    try:
        return ModelConfig(n_items=len(ds.items), dim=dim, n_layers=layers, n_heads=heads, window=window,
                           dropout=dropout, content_buckets=base.content_buckets if ds.catalog else 2,
                           query_buckets=base.query_buckets if has_q else 2,
                           gap_buckets=base.gap_buckets if has_ts else 1)
    except ValueError as exc:  # out-of-range flags: one line naming the bound, not a traceback
        from stream_app.errors import UserError
        raise UserError(f"{exc}; change the flag") from None


def run(args: argparse.Namespace) -> int:
    from model.cache import pick_device
    from stream_app.errors import UserError
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load(args.data, args.format, args.catalog)
    try:
        mc = model_config_for(ds, args.dim, args.layers, args.heads, args.window, args.dropout)
    except ValueError as exc:
        raise UserError(f"bad model shape: {exc}") from None
    tc = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    train(ds, mc, tc, pick_device(args.device), args.out)
    print(f"checkpoint written to {args.out}")
    return 0
