"""Retrieval benchmark: the HNSW two-stage path against exact top-K, per catalog size.

For each item matrix: recall@10 of the two-stage top-10 (graph candidates re-scored
exactly, as the worker serves them) against the exact top-10, microseconds per query in
the worker's shape (batches of `--batch` users, one thread), index build time and memory.
Matrices: random (Gaussian rows with log-normal norms, the hard case for a graph: no
cluster structure), a trained checkpoint's own item matrix, and that matrix resampled to
each catalog size (its rows plus noise, so the structure of trained vectors is kept at
sizes no public dataset has). With `--data` beside a checkpoint, HR@10/NDCG@10 of the
served hybrid on the test split, exact vs two-stage: quality where `auto` would pick the
graph (docs/design.md, "Two-stage retrieval is exact on its candidates").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from model.cache import ItemScorer
from model.retrieval import ANNIndex

NEEDS = ("matplotlib",)  # the [bench] extra, checked before the run starts
EXAMPLES = """examples:
  streamrec bench retrieval --items 24000 1000000 --json retrieval.json --plot retrieval.png
  streamrec bench retrieval --checkpoint runs/beauty --data beauty.pairs.gz --items 24000 1000000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, nargs="+", default=[24_000, 1_000_000], help="catalog sizes")
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[], help="trained checkpoints (matrices)")
    parser.add_argument("--data", type=Path, nargs="*", default=[],
                        help="each checkpoint's dataset: user vectors as queries, and HR/NDCG exact vs two-stage")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=40, help="users per query batch (a worker's refresh batch)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--degree", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("retrieval.json"))
    parser.add_argument("--plot", type=Path, default=Path("retrieval.png"))


def random_matrix(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    norms = torch.exp(0.3 * torch.randn(n, 1, generator=g))
    return torch.randn(n, dim, generator=g) * norms


def near_rows(M: torch.Tensor, n: int, scale: float, seed: int) -> torch.Tensor:
    """`n` rows drawn from `M` plus Gaussian noise of `scale` x its per-dimension spread."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(1, len(M), (n,), generator=g)
    return M[pick] + scale * M[1:].std(0) * torch.randn(n, M.shape[1], generator=g)


def exact_top(M: torch.Tensor, Q: torch.Tensor, k: int, batch: int) -> tuple[torch.Tensor, float]:
    out, t = [], time.perf_counter()
    for i in range(0, len(Q), batch):
        s = Q[i:i + batch] @ M.T
        s[:, 0] = float("-inf")
        out.append(torch.topk(s, k, dim=1).indices)
    return torch.cat(out), (time.perf_counter() - t) / len(Q) * 1e6


def two_stage_top(index: ANNIndex, M: torch.Tensor, Q: torch.Tensor, k: int, c: int,
                  batch: int) -> tuple[torch.Tensor, float]:
    out, t = [], time.perf_counter()
    for i in range(0, len(Q), batch):
        q = Q[i:i + batch]
        cand = index.search(q, c)
        s = torch.bmm(M[cand], q[:, :, None]).squeeze(2).masked_fill(cand == 0, float("-inf"))
        out.append(cand.gather(1, torch.topk(s, k, dim=1).indices))
    return torch.cat(out), (time.perf_counter() - t) / len(Q) * 1e6


def measure(name: str, M: torch.Tensor, Q: torch.Tensor, args: argparse.Namespace, console) -> dict:
    """One matrix: exact and two-stage, same queries, same thread budget."""
    M = M.contiguous()
    truth, exact_us = exact_top(M, Q, 10, args.batch)
    t = time.perf_counter()
    index = ANNIndex.build(M, degree=args.degree, ef_search=args.ef_search)
    build_s = time.perf_counter() - t
    got, ann_us = two_stage_top(index, M, Q, 10, args.candidates, args.batch)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist())]))
    row = {"matrix": name, "items": len(M) - 1, "dim": M.shape[1], "recall_at_10": round(recall, 4),
           "exact_us_per_query": round(exact_us, 1), "ann_us_per_query": round(ann_us, 1),
           "speedup": round(exact_us / ann_us, 2), "build_s": round(build_s, 1),
           "build_threads": index.build_threads, "index_mb": round(index.nbytes() / 2**20, 1),
           "matrix_mb": round(M.numel() * M.element_size() / 2**20, 1)}
    console.print(f"  {name} {row['items']:,} items: recall@10 {recall:.4f}, exact {exact_us:,.0f} µs vs "
                  f"two-stage {ann_us:,.0f} µs per query, build {build_s:.1f} s, index {row['index_mb']} MB")
    return row


def user_queries(model, ds, n: int, seed: int = 0):
    """Test-split contexts of `n` sampled users: their vectors, recent items and targets."""
    from model.data import leave_one_out
    _, _, test = leave_one_out(ds)
    rng = np.random.default_rng(seed)
    chosen = [test[i] for i in rng.choice(len(test), min(n, len(test)), replace=False)]
    from model.features import item_ids
    Q = torch.cat([model.user_vectors([s.context for s in chosen[i:i + 256]]) for i in range(0, len(chosen), 256)])
    recent = model.recent_items([item_ids(s.context) for s in chosen])
    return Q.float(), recent, [model.items.lookup(s.target) for s in chosen]


def served_quality(model, Q: torch.Tensor, recent, targets, args) -> dict:
    """HR@10/NDCG@10 of the served hybrid's top-10, exact vs two-stage (no seen filter)."""
    out = {}
    for mode, ann in (("exact", None), ("two_stage", {"candidates": args.candidates, "ef_search": args.ef_search,
                                                      "degree": args.degree})):
        scorer = ItemScorer(model, ann=ann)
        tops = torch.cat([scorer.topk(Q[i:i + args.batch], 10, None, None, recent[i:i + args.batch])[1]
                          for i in range(0, len(Q), args.batch)])
        hit = [row.index(t) if t in row else -1 for row, t in zip(tops.tolist(), targets)]
        out[mode] = {"hr_at_10": round(float(np.mean([h >= 0 for h in hit])), 4),
                     "ndcg_at_10": round(float(np.mean([1 / math.log2(h + 2) if h >= 0 else 0 for h in hit])), 4)}
    e, a = out["exact"]["ndcg_at_10"], out["two_stage"]["ndcg_at_10"]
    out["ndcg_change_pct"] = round(100 * (a - e) / e, 2) if e else 0.0
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from model import checkpoint
    from model.data import load

    console = Console(width=140)
    torch.set_num_threads(1)
    if args.data and len(args.data) != len(args.checkpoint):
        console.print("--data needs one file per --checkpoint (in the same order)")
        return 2
    rows, quality = [], {}
    g = torch.Generator().manual_seed(1)
    for n in args.items:
        M = random_matrix(n + 1, 64)
        Q = near_rows(M, args.queries, 1.0, 2) * 0.5 + 0.5 * torch.randn(args.queries, 64, generator=g)
        rows.append(measure("random", M, Q, args, console))
    for i, ckpt in enumerate(args.checkpoint):
        model, meta = checkpoint.load(str(ckpt), torch.device("cpu"))
        with torch.no_grad():
            M = model.item_matrix().float()
        name = Path(str(ckpt)).name
        if args.data:
            Q, recent, targets = user_queries(model, load(str(args.data[i])), args.queries)
            quality[name] = served_quality(model, Q, recent, targets, args)
            console.print(f"  {name} served hybrid: {quality[name]}")
        else:
            Q = near_rows(M, args.queries, 0.5, 3)
        rows.append(measure(f"trained:{name}", M, Q, args, console))
        for n in args.items:
            if n > len(M):
                rows.append(measure(f"trained:{name}:resampled", near_rows(M, n + 1, 0.25, 4), Q, args, console))
    table = Table(title=f"two-stage (HNSW degree {args.degree}, C={args.candidates}, ef {args.ef_search}) vs exact "
                        f"top-10 · batch {args.batch} · 1 thread")
    for c in ("matrix", "items", "recall@10", "exact µs/q", "two-stage µs/q", "speedup", "build s", "index MB",
              "matrix MB"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["matrix"], f"{r['items']:,}", f"{r['recall_at_10']:.4f}", f"{r['exact_us_per_query']:,.0f}",
                      f"{r['ann_us_per_query']:,.0f}", f"{r['speedup']:.1f}x", f"{r['build_s']:.1f}",
                      f"{r['index_mb']:,.0f}", f"{r['matrix_mb']:,.0f}")
    console.print(table)
    result = {"rows": rows, "quality": quality, "cpu_count": os.cpu_count(),
              "config": {k: (v if not isinstance(v, (Path, list)) else [str(x) for x in v] if isinstance(v, list)
                             else str(v)) for k, v in vars(args).items() if not k.startswith("_")}}
    args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, marker in (("exact_us_per_query", "exact", "o"), ("ann_us_per_query", "two-stage", "s")):
        for matrix in dict.fromkeys(r["matrix"] for r in rows):
            pts = sorted((r["items"], r[key]) for r in rows if r["matrix"] == matrix)
            ax.plot(*zip(*pts), marker=marker, linestyle="-" if label == "exact" else "--", label=f"{label} · {matrix}")
    ax.set(xscale="log", yscale="log", xlabel="catalog items", ylabel="µs per query (batch, 1 thread)",
           title="top-10 retrieval cost by catalog size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
