"""The latest-recommendation store: bounded, forgets on request, and scores an engagement
against the list the user had before it (the online hit rate per variant)."""
from __future__ import annotations

from stream_app import metrics
from stream_app.pipeline.events import Event
from stream_app.pipeline.latest import LatestStore


def record(*items: str, variant: str = "A") -> dict:
    return {"items": [{"item_id": i, "score": 1.0} for i in items], "variant": variant}


def click(user: str, item: str, kind: str = "click") -> Event:
    return Event(event_id=f"{user}-{item}", user_id=user, type=kind, ts=0.0, item_id=item)


def test_capacity_evicts_least_recently_published():
    store = LatestStore(capacity=2)
    store.put("u1", record("a"))
    store.put("u2", record("b"))
    store.put("u1", record("c"))  # u1 is fresh again
    store.put("u3", record("d"))
    assert len(store) == 2 and store.get("u2") is None and store.get("u1")["items"][0]["item_id"] == "c"
    store.forget("u1")
    assert store.get("u1") is None and len(store) == 1


def test_engagement_scores_hits_per_variant():
    variant = "latest-test"
    hits, chances = metrics.ONLINE_HITS.labels(variant), metrics.ONLINE_OPPORTUNITIES.labels(variant)
    before = hits._value.get(), chances._value.get()
    store = LatestStore()
    store.put("u1", record("a", "b", variant=variant))
    store.score(click("u1", "a"))                 # hit
    store.score(click("u1", "z", "purchase"))     # miss
    store.score(click("u1", "a", "view"))         # a view is not an engagement
    store.score(click("u9", "a"))                 # no recommendations yet: nothing to score
    assert (hits._value.get() - before[0], chances._value.get() - before[1]) == (1, 2)
    assert metrics.ONLINE_HIT_RATE.labels(variant)._value.get() == 0.5
