"""`streamrec eval --protocol prequential`: the continual learner replayed over a file.

Events before `--train-until` only warm the users' histories (the checkpoint was trained
on them); every later event is scored before anything trains on it, by the frozen
checkpoint and, with `--continual`, by the model the learner would be serving at that
moment. The same `Learner` runs live in `streamrec learn`; offline its update clock is
the events' own time, so a file replays identically at any speed.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, replace
from collections import deque
from typing import Iterable

import numpy as np

from model.config import LearnConfig
from model.continual import Learner, Rolling
from model.data import _ts, open_text, parse_event_line
from model.event_types import positive
from model.features import RawEvent, item_ids
from model.seen import excluded
from model.transformer import SeqRec
from stream_app.errors import UserError


def read_events(path: str) -> list[tuple[str, RawEvent]]:
    """(user, event) of a JSONL event file in time order (ties keep file order)."""
    rows = []
    with open_text(path, errors="replace") as f:
        for n, line in enumerate(f):
            parsed = parse_event_line(line) if line.strip() else None
            if parsed is not None:
                rows.append((parsed[1].ts, n, parsed))
    if not rows:
        raise UserError(f"no valid JSONL events in {path}; the prequential protocol needs events with user_id, "
                        "item_id, type and ts")
    if not any(ts for ts, _, _ in rows):
        raise UserError(f"{path} has no timestamps; the prequential protocol replays events by their `ts`")
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def replay(events: Iterable[tuple[str, RawEvent]], model: SeqRec, cfg: LearnConfig, train_until: float,
           continual: bool, seen_policy: tuple, progress: bool = False) -> dict:
    """Test-then-train over `events`; metrics of the served model (and the frozen one)."""
    tracked = {"frozen": copy.deepcopy(model)} if continual else {}
    learner = Learner(model, cfg, seen_policy, tracked=tracked)
    baselines = OnlineBaselines(cfg, seen_policy)
    events = list(events)
    bar = _progress(len(events)) if progress else None
    updates = []
    for i, (user, ev) in enumerate(events):
        live = ev.ts >= train_until
        baselines.observe(user, ev, test=live)
        learner.observe(user, ev, ev.ts, test=live)
        if continual and live and learner.due(ev.ts):
            updates.append(learner.update(ev.ts))
        if bar and i % 1000 == 0:
            bar[0].update(bar[1], completed=i)
    learner.score_pending()
    if bar:
        bar[0].stop()
    served = learner.metrics.get("serving")
    if served is None:
        raise UserError("no event after --train-until has an item and a history before it; "
                        "pick an earlier --train-until")
    out = {"protocol": "prequential", "k": cfg.k, **served.summary(), "updates": len(updates),
           "published": sum(u["published"] for u in updates), "mode": "continual" if continual else "frozen"}
    out["new_item"] = _summary(learner.new_item_metrics, "serving")
    out.update(baselines.summary())
    if continual:
        out["frozen"] = {**learner.metrics["frozen"].summary(), "new_item": _summary(learner.new_item_metrics, "frozen")}
        out["update_seconds_p50"] = float(np.median([u["seconds"] for u in updates])) if updates else 0.0
        out["update_log"] = updates
    return out


class OnlineBaselines:
    """Online co-occurrence and popularity, learning event by event exactly as the worker's
    fallback does (model/cooccurrence.py), scored test-then-train on the same events as the
    learner: the streaming baselines a continual model must beat. Each is scored on the
    top-k list it would publish (the worker's seen-items policy applied), so MRR counts
    only ranks within k."""

    def __init__(self, cfg: LearnConfig, seen_policy: tuple) -> None:
        from model.cooccurrence import CoOccurrence
        self.cfg, self.seen_policy = cfg, seen_policy
        self.co = CoOccurrence()
        self.users: dict[str, deque] = {}
        self.metrics = {name: Rolling(cfg.eval_window) for name in ("cooccurrence", "popularity")}

    def observe(self, user: str, ev: RawEvent, test: bool) -> None:
        hist = self.users.setdefault(user, deque(maxlen=self.cfg.history))
        if not positive(ev.item_id, ev.type):  # a search or a dismiss: context, never a target
            hist.append(ev)
            return
        previous = item_ids(hist)
        if test and hist:
            exclude = excluded(((e.item_id, e.type, e.ts) for e in hist), *self.seen_policy)
            k = self.cfg.k
            pop = [i for i, _ in self.co.popular(k + len(exclude)) if i not in exclude][:k]
            for name, ranked in (("cooccurrence", [i for i, _ in self.co.recommend(previous, k, exclude)]),
                                 ("popularity", pop)):
                self.metrics[name].add(*_list_metrics(ranked, ev.item_id))
        self.co.observe(previous[-self.co.window:], ev.item_id)
        hist.append(ev)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: m.summary() for name, m in self.metrics.items()}


def _list_metrics(ranked: list[str], target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if target in ranked:
        p = ranked.index(target)
        return np.ones(1), np.array([1.0 / np.log2(p + 2.0)]), np.array([1.0 / (p + 1.0)])
    return np.zeros(1), np.zeros(1), np.zeros(1)


def _summary(metrics: dict[str, Rolling], name: str) -> dict[str, float]:
    return metrics[name].summary() if name in metrics else {"hr": 0.0, "ndcg": 0.0, "mrr": 0.0, "events": 0}


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 transient=True)
    p.start()
    return p, p.add_task("prequential", total=total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the prequential protocol (added to `streamrec eval`)."""
    d = LearnConfig()
    g = parser.add_argument_group("prequential protocol")
    g.add_argument("--train-until", metavar="TS", help="events before this time (epoch seconds or ISO 8601) "
                   "only warm histories; every later event is scored, then learned from")
    g.add_argument("--continual", action="store_true", help="learn while replaying (default: the frozen checkpoint)")
    g.add_argument("--learn-every-events", type=int, default=d.every_events, metavar="N")
    g.add_argument("--learn-interval-s", type=float, default=d.interval_s, metavar="S",
                   help="update interval in the events' own time")
    g.add_argument("--update-s", type=float, default=d.update_s, metavar="S", help="fine-tune budget per update")


def run(args: argparse.Namespace, seen_policy: tuple) -> dict:
    from model import checkpoint
    from model.cache import pick_device
    if not args.checkpoint:
        raise UserError("the prequential protocol evaluates a checkpoint; pass --checkpoint DIR")
    if args.train_until is None:
        raise UserError("the prequential protocol needs --train-until TS (where scoring starts)")
    try:
        until = _ts(args.train_until)
    except ValueError:
        raise UserError(f"--train-until {args.train_until!r} is neither epoch seconds nor ISO 8601") from None
    t0 = time.time()
    events = read_events(args.data)
    model, meta = checkpoint.load(args.checkpoint, pick_device(args.device))
    cfg = replace(LearnConfig(), k=args.k, every_events=args.learn_every_events, interval_s=args.learn_interval_s,
                  update_s=args.update_s)
    res = replay(events, model, cfg, until, args.continual, seen_policy, progress=True)
    res.update(checkpoint=args.checkpoint, model_version=meta.get("version"), data=args.data,
               train_until=until, learn_config=asdict(cfg), seconds=round(time.time() - t0, 2))
    return res
