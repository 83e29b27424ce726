"""Replay held-out histories through a live worker and read what it published.

Each evaluated user's context (everything before the held-out item) is sent as events,
keyed by user and in order; then the recommendations topic is read, as any subscriber
would, until every user's latest record reflects their last context event. The lists
are then scored against the held-out items exactly as the offline full protocol scores
a ranking, so live and offline quality can be compared under one seen-items policy.
"""
from __future__ import annotations

import json
import math
import time
from itertools import zip_longest
from typing import Iterator, Sequence

from model.data import Split
from stream_app.config import Settings

PAIRS_BASE_TS = 1_600_000_000  # events of timestamp-less data get one valid time (the model ignores gaps then)


def user_key(split: Split) -> str:
    return f"u{split.user}"


def context_events(split: Split) -> list[dict]:
    """The split's context as contract events; event ids are stable, so a re-run dedupes."""
    user = user_key(split)
    return [{"event_id": f"{user}-{n}", "user_id": user, "type": e.type, "ts": e.ts or PAIRS_BASE_TS,
             **({"item_id": e.item_id} if e.item_id else {}), **({"query": e.query} if e.query else {})}
            for n, e in enumerate(split.context)]


def interleaved(splits: Sequence[Split]) -> Iterator[dict]:
    """Users' events round-robin: every user's order kept, users mixed as in a live stream."""
    for row in zip_longest(*(context_events(s) for s in splits)):
        yield from (e for e in row if e is not None)


BIG_BATCHES = {"linger_ms": 100, "batch_size": 512 * 1024}  # few, large batches (docs/facts.md)


def replay(settings: Settings, splits: Sequence[Split], timeout: float = 900.0, say=print,
           producer_options: dict | None = None) -> dict[str, dict]:
    """Send every split's context, then wait until each user's latest record answers their
    last event; returns the latest record per user (users still missing at `timeout` are absent).
    `producer_options`: kafka-python producer settings (default BIG_BATCHES)."""
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.harness import RecommendationWatcher

    last = {user_key(s): f"{user_key(s)}-{len(s.context) - 1}" for s in splits if s.context}
    watcher = RecommendationWatcher(settings.bootstrap_servers, settings.recommendations_topic)
    watcher.start()
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic,
                             BIG_BATCHES if producer_options is None else producer_options)
    try:
        sent = producer.paced(((json.dumps(e).encode(), e["user_id"].encode()) for e in interleaved(splits)),
                              rate=None, progress=True)
        say(f"replay: {sent} events of {len(splits)} users sent; waiting for their recommendations")
        deadline, reported = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline:
            done = sum(watcher.latest.get(u, {}).get("event_id") == e for u, e in last.items())
            if done == len(last):
                break
            if time.monotonic() - reported > 10:
                reported = time.monotonic()
                say(f"replay: {done}/{len(last)} users answered")
            time.sleep(0.5)
        return {u: dict(watcher.latest[u]) for u, e in last.items()
                if watcher.latest.get(u, {}).get("event_id") == e}
    finally:
        producer.close()
        watcher.close()


def score_lists(splits: Sequence[Split], published: dict[str, dict], k: int) -> dict:
    """HR@k and NDCG@k of the held-out items in the published lists (a missing list is a miss)."""
    hr = ndcg = 0.0
    for s in splits:
        items = [i["item_id"] for i in published.get(user_key(s), {}).get("items", [])][:k]
        if s.target in items:
            rank = items.index(s.target)
            hr += 1.0
            ndcg += 1.0 / math.log2(rank + 2)
    n = max(len(splits), 1)
    return {"protocol": "live", "k": k, "users": len(splits), "answered": len(published),
            "hr": hr / n, "ndcg": ndcg / n}
