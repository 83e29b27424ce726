"""The latest-recommendation store: keeps what was published per user and partition,
forgets on request, refills partitions it gains without overwriting what was published
meanwhile, drops partitions it loses, and scores an engagement against the list the user
had before it (the online hit rate per variant)."""
from __future__ import annotations

import orjson

from stream_app import metrics
from stream_app.pipeline.events import Event
from stream_app.pipeline.latest import LatestStore, encode_record


def record(*items: str, variant: str = "A") -> dict:
    return {"items": [{"item_id": i, "score": 1.0} for i in items], "variant": variant}


def click(user: str, item: str, kind: str = "click") -> Event:
    return Event(event_id=f"{user}-{item}", user_id=user, type=kind, ts=0.0, item_id=item)


def test_put_returns_the_published_bytes_and_forget_drops_them():
    store = LatestStore()
    value = store.put("u1", record("a"), 0)
    assert value == encode_record(record("a")) and store.get("u1") == value
    assert store.record("u1") == record("a") and len(store) == 1
    store.forget("u1", 0)
    assert store.get("u1") is None and len(store) == 0


def test_refill_fills_gained_partitions_and_keeps_what_was_published_meanwhile():
    store = LatestStore()
    assert store.assign([0, 1]) == {0, 1} and store.loading == {0, 1}
    store.put("fresh", record("new"), 0)      # published by this worker while partition 0 loads
    store.forget("gone", 0)                   # forgotten meanwhile: the refill must not bring it back
    store.loaded(0, {"fresh": encode_record(record("old")), "gone": encode_record(record("x")),
                     "kept": encode_record(record("k")), "tomb": encode_record(record("t"))} | {"tomb": None})
    assert store.loading == {1}
    assert store.record("fresh") == record("new") and store.get("gone") is None
    assert store.record("kept") == record("k") and store.get("tomb") is None
    store.loaded(1, {"other": encode_record(record("o"))})
    assert not store.loading and store.record("other") == record("o")


def test_a_lost_partition_is_dropped_and_a_kept_one_is_not_reread():
    store = LatestStore()
    store.assign([0, 1])
    store.loaded(0, {"a": encode_record(record("a"))})
    store.loaded(1, {"b": encode_record(record("b"))})
    assert store.assign([1, 2]) == {2}             # 1 kept, 2 gained, 0 lost
    assert store.get("a") is None and store.record("b") == record("b")
    store.loaded(0, {"late": b"{}"})              # a refill of a lost partition finishing late: ignored
    assert store.get("late") is None


def test_an_interrupted_refill_is_restarted_at_the_next_assignment():
    store = LatestStore()
    store.assign([0, 1])
    store.loaded(0, {})
    assert store.assign([0, 1]) == {1}


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
    assert orjson.loads(store.get("u1"))["variant"] == variant
