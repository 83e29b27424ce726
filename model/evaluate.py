"""Evaluate a checkpoint or a baseline under the sampled or full leave-one-out protocol.

sampled: the held-out item against 100 items the user never interacted with, drawn
uniformly with a fixed seed (SASRec protocol). full: against every item except those the
seen-items policy excludes (model/seen.py, the worker's rule too: `interacted` is the
published full-ranking protocol); a held-out item the policy excludes counts as a miss,
as the worker would never show it. Ties are broken uniformly at random *in expectation* (metrics are
exact expectations), so a constant-score baseline gets chance level, not rank 1.
MRR is untruncated; HR and NDCG are @k.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from model.data import Dataset, Split, leave_one_out, load
from model.event_types import positive
from model.features import RawEvent, item_ids as item_ids_of
from model.seen import POLICIES, excluded
from model.transformer import SeqRec

if TYPE_CHECKING:
    from model.rules import Rules

EXAMPLES = """examples:
  streamrec eval --checkpoint runs/games --data games.txt --format pairs --protocol sampled --k 10 --json m.json
  streamrec eval --baseline cooccurrence --data games.txt --format pairs --protocol full --json base.json
  streamrec eval --checkpoint runs/shop --data events.jsonl --catalog catalog.jsonl --split valid
"""
PARTS = ("served", "transformer", "transition")
ScoreFn = Callable[[list[list[RawEvent]], "np.ndarray | None"], np.ndarray]


def rank_metrics(greater: np.ndarray, ties: np.ndarray, k: int) -> dict[str, float]:
    """Mean HR@k, NDCG@k, MRR of a target with `greater` items scored above it and `ties`
    other items scored equal, expected over uniform random tie-breaking."""
    if len(greater) == 0:
        return {"hr": 0.0, "ndcg": 0.0, "mrr": 0.0}
    hr, ndcg, mrr = rank_values(greater, ties, k)
    return {"hr": float(hr.mean()), "ndcg": float(ndcg.mean()), "mrr": float(mrr.mean())}


def rank_values(greater: np.ndarray, ties: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-target HR@k, NDCG@k and MRR (expected over tie-breaking), for rolling metrics."""
    g, t = np.asarray(greater, np.int64), np.asarray(ties, np.int64)
    if len(g) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    top = int((g + t).max()) + 2
    gain = np.where(np.arange(top) < k, 1.0 / np.log2(np.arange(top) + 2.0), 0.0)
    cg = np.concatenate([[0.0], np.cumsum(gain)])                 # cg[p] = sum of gain[:p]
    ch = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])  # ch[p] = H_p
    n = t + 1.0
    hr = (np.clip(k - g, 0, None).clip(max=t + 1)) / n
    ndcg = (cg[g + t + 1] - cg[g]) / n
    mrr = (ch[g + t + 1] - ch[g]) / n
    return hr, ndcg, mrr


def sample_negatives(splits: Sequence[Split], index: dict[str, int], n: int = 100, seed: int = 0) -> np.ndarray:
    """[U, n] uniform negatives per user, never an item the user interacted with (-1 pads
    when a tiny catalog has fewer than n)."""
    rng = np.random.default_rng(seed)
    N = len(index)
    out = np.full((len(splits), n), -1, dtype=np.int64)
    for r, s in enumerate(splits):
        seen = {index[i] for i in s.seen if i in index}
        avail = N - len(seen)
        if avail <= n:
            cand = np.array([i for i in range(N) if i not in seen], dtype=np.int64)
            out[r, : len(cand)] = cand
            continue
        got: list[int] = []
        have = set(seen)
        while len(got) < n:
            for x in rng.integers(0, N, size=2 * n).tolist():
                if x not in have:
                    have.add(x)
                    got.append(x)
                    if len(got) == n:
                        break
        out[r] = got
    return out


def evaluate(score: ScoreFn, splits: Sequence[Split], item_ids: Sequence[str], protocol: str = "sampled",
             k: int = 10, seed: int = 0, batch_size: int = 512, progress: bool = False,
             negatives: np.ndarray | None = None, seen_policy: tuple | None = None) -> dict:
    """`seen_policy`: (exclude_seen, window[, dismiss_ttl_s]) of the full protocol; default the worker's."""
    seen_policy = seen_policy or worker_seen_policy()
    index = {iid: i for i, iid in enumerate(item_ids)}
    splits = [s for s in splits if s.target in index]
    tgt = np.array([index[s.target] for s in splits], dtype=np.int64)
    if protocol == "sampled" and negatives is None:
        negatives = sample_negatives(splits, index, 100, seed)
    negs = negatives
    greater = np.zeros(len(splits), np.int64)
    ties = np.zeros(len(splits), np.int64)
    never = np.zeros(len(splits), bool)  # held-out items the seen-items policy hides: misses
    bar = _progress(f"eval {protocol}", len(splits)) if progress else None
    # batches of similar context length: a batch is padded to its longest history, and one
    # long history in a batch of short ones made the forward ~10x dearer
    order = np.argsort([len(s.context) for s in splits], kind="stable")
    for lo in range(0, len(splits), batch_size):
        idx = order[lo: lo + batch_size]
        ctx = [splits[i].context for i in idx]
        if protocol == "sampled":
            cand = np.concatenate([tgt[idx, None], negs[idx]], axis=1)
            s = np.asarray(score(ctx, np.maximum(cand, 0)), dtype=np.float64)
            s[:, 1:][cand[:, 1:] < 0] = -np.inf
            other = s[:, 1:]
        else:
            s = np.asarray(score(ctx, None), dtype=np.float64).copy()
            rows = np.arange(len(idx))
            ts = s[rows, tgt[idx]].copy()
            for r, i in enumerate(idx):
                seen = excluded(((e.item_id, e.type, e.ts) for e in ctx[r]), *seen_policy)
                s[r, [index[x] for x in seen if x in index]] = -np.inf
                never[i] = splits[i].target in seen
            s[rows, tgt[idx]] = -np.inf
            s, other = ts[:, None], s
        greater[idx] = (other > s[:, :1]).sum(1)
        ties[idx] = (other == s[:, :1]).sum(1)
        if bar:
            bar[0].update(bar[1], advance=len(idx))
    if bar:
        bar[0].stop()
    greater[never], ties[never] = len(item_ids), 0
    return {"protocol": protocol, "k": k, "users": len(splits), **rank_metrics(greater, ties, k)}


def evaluate_lists(score: ScoreFn, splits: Sequence[Split], item_ids: Sequence[str], k: int,
                   rules_of: Callable[[int], "Rules"], meta: Mapping[str, Mapping], pool: int,
                   seen_policy: tuple | None = None, batch_size: int = 512) -> dict:
    """HR@k / NDCG@k of the list the worker would publish under rules: the best `pool` items
    by score (the seen-items policy applied), then `model.rules.apply`, as live
    (docs/design.md, "Rules are applied after scoring"). `rules_of(i)` gives split i's
    rules (a surface's, or one drawn per request). Also counts, with the independent
    `violations`, every list that breaks its rules: there must be none."""
    from model.rules import apply, pool_size, violations

    seen_policy = seen_policy or worker_seen_policy()
    index = {iid: i for i, iid in enumerate(item_ids)}
    kept = [i for i, s in enumerate(splits) if s.target in index]
    hr = ndcg = mrr = 0.0
    broken = short = 0
    for lo in range(0, len(kept), batch_size):
        idx = kept[lo: lo + batch_size]
        ctx = [splits[i].context for i in idx]
        s = torch.as_tensor(np.asarray(score(ctx, None), dtype=np.float32))
        for r, i in enumerate(idx):
            seen = excluded(((e.item_id, e.type, e.ts) for e in ctx[r]), *seen_policy)
            s[r, [index[x] for x in seen if x in index]] = float("-inf")
        for r, i in enumerate(idx):
            rules = rules_of(i)
            top = torch.topk(s[r], min(pool_size(k, rules, pool), s.shape[1]))
            ranked = [(item_ids[j], v) for j, v in zip(top.indices.tolist(), top.values.tolist()) if v > float("-inf")]
            got = [item for item, _ in apply(ranked, rules, meta, k)]
            broken += bool(violations(got, rules, meta))
            short += len(got) < k
            if splits[i].target in got:
                pos = got.index(splits[i].target)
                hr, ndcg, mrr = hr + 1.0, ndcg + 1.0 / float(np.log2(pos + 2)), mrr + 1.0 / (pos + 1)
    n = max(len(kept), 1)
    return {"k": k, "users": len(kept), "hr": hr / n, "ndcg": ndcg / n, "mrr": mrr / n,  # mrr within the list
            "violations": broken, "short_lists": short}


def last_item_splits(splits: Sequence[Split]) -> list[Split]:
    """"Next item given the last one": each split's context cut to its newest item event,
    the question an item page asks (the similar-items surface, model_recommender.similar)."""
    out = []
    for s in splits:
        last = next((e for e in reversed(s.context) if positive(e.item_id, e.type)), None)  # no dismiss
        if last is not None:
            out.append(Split(s.user, [RawEvent(last.item_id, "click", 0.0)], s.target, {last.item_id}))
    return out


def model_scorer(model: SeqRec, item_ids: Sequence[str], catalog: dict | None = None,
                 part: str = "served", memo: dict | None = None) -> ScoreFn:
    """Scores over the data's items by `model.scores`, exactly what the worker ranks by; items
    the checkpoint never saw get content-only (or OOV) vectors. `part` isolates a term of
    the hybrid: `transformer` (u · M alone) or `transition` (the transition term alone).
    `memo` keeps user vectors by batch across calls on the same splits (the blend search
    scores one model under many weights)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    items = model.items
    for iid in item_ids:
        if iid not in items.index and catalog and iid in catalog:
            items.add(iid, catalog[iid])
    cols = torch.tensor([items.lookup(i) for i in item_ids], device=model.device)
    model.eval()
    with torch.no_grad():
        M = model.item_matrix().float()

    def score(ctx: list[list[RawEvent]], cand: np.ndarray | None) -> np.ndarray:
        recent = model.recent_items([item_ids_of(h) for h in ctx])
        with torch.no_grad():
            if part == "transition":
                s = model.transition.scores(recent, len(M), model.cfg.trans_window)
            else:
                key = (id(ctx[0]), len(ctx)) if ctx else None
                u = memo.get(key) if memo is not None else None
                if u is None:
                    u = model.user_vectors(ctx).float()
                    if memo is not None:
                        memo[key] = u
                s = model.scores(u, recent if part == "served" else None, M)
            s = s[:, cols]
            if cand is None:
                return s.cpu().numpy()
            return torch.gather(s, 1, torch.as_tensor(cand, device=s.device)).cpu().numpy()
    return score


def baseline_scorer(name: str, fit: list[list[RawEvent]], item_ids: Sequence[str]) -> ScoreFn:
    """popularity, or co-occurrence with popularity as a tie-breaker far below any neighbour score."""
    index = {iid: i for i, iid in enumerate(item_ids)}
    seqs = [item_ids_of(h) for h in fit]
    counts = Counter(i for s in seqs for i in s)
    pop = np.zeros(len(item_ids))
    for iid, c in counts.items():
        if iid in index:
            pop[index[iid]] = c
    pop /= max(pop.max(), 1.0)
    if name == "popularity":
        return lambda ctx, cand: np.broadcast_to(pop, (len(ctx), len(pop))) if cand is None else pop[cand]
    if name != "cooccurrence":
        raise ValueError(name)
    from model.cooccurrence import CoOccurrence
    co = CoOccurrence().fit(seqs)

    def score(ctx: list[list[RawEvent]], cand: np.ndarray | None) -> np.ndarray:
        out = np.tile(pop * 1e-12, (len(ctx), 1))
        for r, h in enumerate(ctx):
            sc = co.scores(item_ids_of(h))
            if sc:
                cols = [index[i] for i in sc if i in index]
                out[r, cols] += [sc[i] for i in sc if i in index]
        return out if cand is None else np.take_along_axis(out, cand, 1)
    return score


FITTED_ON = "train: each user's events before the validation item (what the transformer trains on)"


def baseline_fit_data(ds: Dataset) -> list[list[RawEvent]]:
    """What every baseline is fitted on, for both splits: exactly the transformer's training
    histories, so no model sees a held-out transition the others do not (equal footing)."""
    return leave_one_out(ds)[0]


def _progress(desc: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 transient=True)
    p.start()
    return p, p.add_task(desc, total=total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory written by `streamrec train`")
    who.add_argument("--baseline", choices=("popularity", "cooccurrence"), help="evaluate a baseline instead")
    parser.add_argument("--data", required=True, metavar="PATH", help="JSONL events or `user item` pairs file")
    parser.add_argument("--format", default="auto", choices=("auto", "jsonl", "pairs"))
    parser.add_argument("--catalog", metavar="FILE", help="JSONL catalog (item_id, title, category) for content")
    parser.add_argument("--protocol", default="sampled", choices=("sampled", "full", "prequential"),
                        help="prequential: test-then-train over a time-ordered JSONL stream (model/prequential.py)")
    parser.add_argument("--part", default="served", choices=PARTS,
                        help="with --checkpoint: the served (hybrid) score, or one of its terms alone")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--split", default="test", choices=("test", "valid"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives")
    parser.add_argument("--exclude-seen", choices=POLICIES, default=None,
                        help="full protocol: items never recommended back (default: the worker's exclude_seen)")
    parser.add_argument("--exclude-seen-window", type=int, default=None, metavar="N",
                        help="only the last N item events count as seen (default: the worker's setting)")
    parser.add_argument("--surface", metavar="NAME", default=None,
                        help="full protocol: score the lists a surface's rules leave, as the worker publishes them "
                             "(the surfaces file's rules on the best --rules-pool candidates; docs/contracts.md, Rules)")
    parser.add_argument("--surfaces-file", metavar="FILE", default=None, help="the worker's surfaces file (TOML)")
    parser.add_argument("--rules-pool", type=int, default=None, metavar="N",
                        help="candidates before the rules (default: the worker's rules_pool)")
    parser.add_argument("--json", metavar="OUT", help="write the metrics as JSON here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    from model import prequential
    prequential.add_arguments(parser)


def worker_seen_policy(policy: str | None = None, window: int | None = None) -> tuple[str, int, float]:
    """The given policy, else the worker's default, so offline and live exclude the same items."""
    from stream_app.config import Settings

    fields = Settings.model_fields
    return (policy or fields["exclude_seen"].default,
            fields["exclude_seen_window"].default if window is None else window, fields["dismiss_ttl_s"].default)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from model.cache import pick_device
    t0 = time.time()
    if args.protocol == "prequential":
        return _run_prequential(args)
    ds = load(args.data, args.format, args.catalog)
    _, valid, test = leave_one_out(ds)
    splits = test if args.split == "test" else valid
    if args.checkpoint:
        from model import checkpoint
        model, meta = checkpoint.load(args.checkpoint, pick_device(args.device))
        score = model_scorer(model, ds.items, ds.catalog, args.part)
        who = {"checkpoint": args.checkpoint, "part": args.part, "model_version": meta.get("version")}
    else:
        score = baseline_scorer(args.baseline, baseline_fit_data(ds), ds.items)
        who = {"baseline": args.baseline, "fitted_on": FITTED_ON}
    policy = worker_seen_policy(args.exclude_seen, args.exclude_seen_window)
    if args.surface:
        res = _surface_lists(args, score, splits, ds, policy)
    else:
        res = evaluate(score, splits, ds.items, args.protocol, args.k, args.seed, progress=True, seen_policy=policy)
    res.update(who, split=args.split, exclude_seen=policy[0], exclude_seen_window=policy[1], data=ds.path, data_fingerprint=ds.fingerprint, items=len(ds.items),
               seconds=round(time.time() - t0, 2))
    table = Table(title=f"{who.get('baseline') or 'model'} · {args.protocol} · {args.split}")
    for col in ("users", f"HR@{args.k}", f"NDCG@{args.k}", "MRR"):
        table.add_column(col, justify="right")
    table.add_row(str(res["users"]), f"{res['hr']:.4f}", f"{res['ndcg']:.4f}", f"{res['mrr']:.4f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _surface_lists(args: argparse.Namespace, score: ScoreFn, splits: Sequence[Split], ds: Dataset,
                   policy: tuple) -> dict:
    """The lists the worker publishes for a surface: its rules on the best candidates."""
    from pathlib import Path

    from stream_app.config import Settings
    from stream_app.errors import UserError
    from stream_app.serving.surfaces import load as load_surfaces

    if args.protocol != "full":
        raise UserError("--surface scores published lists, a full ranking; add --protocol full")
    surfaces = load_surfaces(Path(args.surfaces_file) if args.surfaces_file else None, args.k)
    if args.surface not in surfaces:
        raise UserError(f"no surface {args.surface!r} in {args.surfaces_file or 'the defaults'}; "
                        f"use one of {', '.join(sorted(surfaces))}")
    rules = surfaces[args.surface].rules
    pool = args.rules_pool or Settings.model_fields["rules_pool"].default
    res = evaluate_lists(score, splits, ds.items, args.k, lambda i: rules, ds.catalog or {}, pool, policy)
    return {"protocol": "full", "surface": args.surface, "rules_pool": pool, **res}


def _run_prequential(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from model import prequential
    res = prequential.run(args, worker_seen_policy(args.exclude_seen, args.exclude_seen_window))
    table = Table(title=f"prequential · {res['mode']} · {res['events']} events, {res['updates']} updates "
                        f"({res['published']} published)")
    for col in ("model", f"HR@{args.k}", f"NDCG@{args.k}", "MRR", f"new-item HR@{args.k}"):
        table.add_column(col, justify="right")
    rows = [(res["mode"], res)] + ([("frozen", res["frozen"])] if "frozen" in res else [])
    for name, m in rows:
        table.add_row(name, f"{m['hr']:.4f}", f"{m['ndcg']:.4f}", f"{m['mrr']:.4f}", f"{m['new_item']['hr']:.4f}")
    for name in ("cooccurrence", "popularity"):  # online baselines, scored on their top-k lists
        m = res[name]
        table.add_row(f"{name} (online)", f"{m['hr']:.4f}", f"{m['ndcg']:.4f}", f"{m['mrr']:.4f}", "")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
