"""Inference benchmark: per-event cost of the incremental KV-cache step vs full recompute.

Both paths start from raw events (tokenization included), because that is what the
streaming engine pays; a forward-only comparison (pre-tokenized) is reported beside it so
the speedup is not mistaken for a Python-overhead artefact. "Full recompute" runs the
offline forward over the whole stored history; "truncated" over only the last
receptive_field events (the cheapest exact alternative to a cache).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from model.cache import KVCachePool, pick_device
from model.config import ModelConfig
from model.features import ItemIndex, RawEvent, encode
from model.transformer import SeqRec

EXAMPLES = """examples:
  streamrec bench inference --json bench.json
  streamrec bench inference --device cuda --dtype bf16 --json bench_gpu.json
  streamrec bench inference --checkpoint runs/games --histories 50,200 --batches 1,256
"""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn(); _sync(dev)
    out = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); _sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bench(model: SeqRec, histories: tuple[int, ...] = (50, 200), batches: tuple[int, ...] = (1, 256),
          steps: int = 10, repeats: int = 3, device: torch.device | None = None,
          dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    dev = device or pick_device(None)
    g = torch.Generator().manual_seed(seed)
    n_items = len(model.items) - 1
    ids = model.items.ids
    rows = []
    for H in histories:
        for B in batches:
            total = H + steps
            item = torch.randint(1, n_items + 1, (B, total), generator=g).tolist()
            hist = [[RawEvent(ids[i], "click", 1.7e9 + 60.0 * t) for t, i in enumerate(r)] for r in item]
            pool = KVCachePool(model, B, dev, dtype)
            slots = torch.arange(B, device=dev)
            mdl = pool.model

            def incremental():
                pool.rebuild(slots, [h[:H] for h in hist])  # not timed per event: subtracted below
                for t in range(steps):
                    pool.step(slots, [h[H + t] for h in hist])

            def rebuild_only():
                pool.rebuild(slots, [h[:H] for h in hist])

            with torch.no_grad():
                t_inc = (_time(incremental, dev, repeats) - _time(rebuild_only, dev, repeats)) / steps
                ctx = [h[: H + 1] for h in hist]
                t_full = _time(lambda: mdl.user_vectors(ctx, truncate=False), dev, repeats)
                t_trunc = _time(lambda: mdl.user_vectors(ctx, truncate=True), dev, repeats)
                b_full = encode(ctx, mdl.items, None).to(dev)
                t_full_fwd = _time(lambda: mdl(b_full)[:, -1], dev, repeats)
                t_tok = _time(lambda: encode([[h[H]] for h in hist], mdl.items, 1,
                                             prev_ts=[h[H - 1].ts for h in hist]), dev, repeats)
            rows.append({
                "history": H, "batch": B,
                "incremental_us_per_event": 1e6 * t_inc / B,
                "full_us_per_event": 1e6 * t_full / B,
                "truncated_us_per_event": 1e6 * t_trunc / B,
                "full_forward_only_us_per_event": 1e6 * t_full_fwd / B,
                "incremental_forward_only_us_per_event": 1e6 * max(t_inc - t_tok, 1e-9) / B,
                "speedup": t_full / t_inc,
                "speedup_vs_truncated": t_trunc / t_inc,
                "speedup_forward_only": t_full_fwd / max(t_inc - t_tok, 1e-9),
            })
    out = {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "config": model.cfg.to_dict(), "n_items": n_items, "steps": steps, "repeats": repeats, "rows": rows,
    }
    for r in rows:
        out[f"speedup_h{r['history']}_b{r['batch']}"] = round(r["speedup"], 2)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="inference", choices=("inference",))
    parser.add_argument("--json", metavar="OUT", help="write results as JSON")
    parser.add_argument("--checkpoint", metavar="DIR", help="benchmark a trained checkpoint (default: random init)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 is meant for CUDA")
    parser.add_argument("--histories", default="50,200", help="comma-separated history lengths")
    parser.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="incremental steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=24_000, help="catalog size for a random-init model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    if args.checkpoint:
        from model import checkpoint
        model, _ = checkpoint.load(args.checkpoint, dev)
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(n_items=args.items, content_buckets=2, query_buckets=2)
        model = SeqRec(cfg, ItemIndex([f"i{i}" for i in range(args.items)], cfg)).eval()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    res = bench(model, tuple(int(x) for x in args.histories.split(",")), tuple(int(x) for x in args.batches.split(",")),
                args.steps, args.repeats, dev, dtype)
    t = Table(title=f"incremental step vs full recompute · {res['device']} {res['dtype']} · {res['threads']} threads")
    for c in ("history", "batch", "incr µs/event", "full µs/event", "trunc µs/event", "speedup", "vs trunc",
              "fwd-only speedup"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(str(r["history"]), str(r["batch"]), f"{r['incremental_us_per_event']:.1f}", f"{r['full_us_per_event']:.1f}",
                  f"{r['truncated_us_per_event']:.1f}", f"{r['speedup']:.1f}x", f"{r['speedup_vs_truncated']:.1f}x",
                  f"{r['speedup_forward_only']:.1f}x")
    Console(width=130).print(t)
    print(f"speedup_h200_b256 = {res.get('speedup_h200_b256')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
