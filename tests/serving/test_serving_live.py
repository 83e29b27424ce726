"""The transformer in the live pipeline, end to end over a real broker and worker process:
output-topic parity with the offline model, lookups, catalog, forget, hot swap."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from model import checkpoint
from stream_app.clients.forget import forget_event
from stream_app.testing.harness import TopicReader, metric_sum
from stream_app.clients.produce import EventProducer
from stream_app.testing.consistency import replay
from tests.helpers import assert_same_ranking, offline_recommend, train_tiny

pytestmark = pytest.mark.integration
HISTORY = 60


def produce(settings, events, topic=None):
    producer = EventProducer(settings.bootstrap_servers, topic or settings.events_topic)
    for e in events:
        producer.send_event(e)
    producer.close()


def latest_until_caught_up(reader: TopicReader, events: list[dict], timeout: float = 90,
                           latest: dict[str, dict] | None = None) -> dict[str, dict]:
    """Read recommendations until each user's latest reflects their newest event.

    `latest` carries what earlier calls on the same reader already consumed."""
    newest = {e["user_id"]: e["event_id"] for e in events}
    latest = {} if latest is None else latest

    def done(records):
        for r in records[done.seen:]:
            if r.value is not None:
                rec = json.loads(r.value)
                latest[rec["user_id"]] = rec
        done.seen = len(records)
        return all(latest.get(u, {}).get("event_id") == eid for u, eid in newest.items())

    done.seen = 0
    records = reader.read_until(done, timeout)
    stale = [u for u, eid in newest.items() if latest.get(u, {}).get("event_id") != eid]
    example = stale and (stale[0], newest[stale[0]], latest.get(stale[0], {}).get("event_id"))
    assert not stale, (f"{len(stale)} users' latest recommendation does not reflect their newest event "
                       f"({len(records)} records read; e.g. user, newest, latest: {example})")
    return latest


def assert_parity(model, events, latest, version, seen_policy=None):
    states = replay(events, HISTORY)
    users = sorted(states)
    expected = offline_recommend(model, [states[u] for u in users], 10, seen_policy)
    for user, want in zip(users, expected):
        rec = latest[user]
        assert rec["model_version"] == version
        assert_same_ranking([(i["item_id"], i["score"]) for i in rec["items"]], want)


@pytest.mark.parametrize("policy", [("none", 0), ("purchased", 0), ("interacted", 5)])
def test_published_lists_equal_offline_ranking_under_the_seen_policy(policy, world, make_settings, start_worker):
    """The worker and the offline ranking exclude the same seen items (model/seen.py)."""
    events, _, ckpt = world
    events = events[:1500]
    settings = make_settings(model_dir=ckpt, history_max=HISTORY, exclude_seen=policy[0],
                             exclude_seen_window=policy[1])
    start_worker(settings)
    produce(settings, events)
    latest = latest_until_caught_up(TopicReader(settings.bootstrap_servers, settings.recommendations_topic), events)
    model, meta = checkpoint.load(str(ckpt))
    assert_parity(model, events, latest, meta["version"], policy)
    if policy == ("purchased", 0):  # nothing the user bought comes back
        states = replay(events, HISTORY)
        assert all(not {i["item_id"] for i in rec["items"]} & states[user].seen_items("purchased")
                   for user, rec in latest.items())


def test_output_topic_matches_offline_model(world, make_settings, start_worker):
    events, catalog_rows, ckpt = world
    settings = make_settings(model_dir=ckpt, history_max=HISTORY)
    worker = start_worker(settings)
    produce(settings, events)
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    latest = latest_until_caught_up(reader, events)
    model, meta = checkpoint.load(str(ckpt))
    assert len(latest) > 100
    # `streamrec train` made a hybrid: parity covers the transition term the worker adds
    assert model.cfg.trans_weight > 0 and model.transition.entries > 0
    assert_parity(model, events, latest, meta["version"])

    # lookup: the owning worker answers with the latest record
    user = events[-1]["user_id"]
    answer = json.loads(worker.get(f"/recommendations/{user}"))
    assert answer["source"] == "published" and {k: answer[k] for k in latest[user]} == latest[user]

    # catalog: the user's top item becomes unavailable, a brand-new item appears
    top = latest[user]["items"][0]["item_id"]
    row = next(r for r in catalog_rows if r["item_id"] == top)
    producer = EventProducer(settings.bootstrap_servers, settings.catalog_topic)
    producer.send(json.dumps({**row, "available": False}).encode(), top.encode())
    producer.send(json.dumps({"item_id": "i-brand-new", "title": "Acme new gadget", "category": row["category"]}).encode(),
                  b"i-brand-new")
    producer.close()
    sent = time.monotonic()
    while worker.metrics().get('streamrec_catalog_items{state="unavailable"}', 0) < 1:
        assert time.monotonic() - sent < 1.0, "catalog upsert not applied within 1 s"
        time.sleep(0.05)
    again = {"event_id": "after-catalog", "user_id": user, "type": "view", "item_id": events[-1].get("item_id") or top,
             "ts": events[-1]["ts"] + 1}
    produce(settings, [again])
    latest = latest_until_caught_up(reader, events + [again], latest=latest)
    assert top not in [i["item_id"] for i in latest[user]["items"]]

    # forget: state, latest recommendations and both tombstones
    produce(settings, [forget_event(user)])
    deadline = time.monotonic() + 30
    while json.loads(worker.get(f"/recommendations/{user}"))["source"] != "fallback":  # not their old list
        assert time.monotonic() < deadline, "forget not applied"
        time.sleep(0.2)
    tombstones = reader.read_until(lambda rs: any(r.key == user.encode() and r.value is None for r in rs), 10)
    assert any(r.key == user.encode() and r.value is None for r in tombstones)
    changelog = TopicReader(settings.bootstrap_servers, f"{settings.app_id}-users-changelog")
    records = changelog.read_until(lambda rs: any(r.value is None for r in rs), 15)
    mine = [r for r in records if json.loads(r.key) == user]
    assert mine and mine[-1].value is None, "no changelog tombstone for the forgotten user"
    for r in (reader, changelog):
        r.close()


def test_a_dismissed_item_leaves_the_next_list_and_a_dismiss_without_item_is_dead_lettered(
        world, make_settings, start_worker):
    """docs/contracts.md, "Dismiss": the next record for the user lacks the item they
    dismissed from their current list, ranked as offline; no item_id: DLQ, missing_field."""
    events, _, ckpt = world
    events = events[:800]
    settings = make_settings(model_dir=ckpt, history_max=HISTORY)
    worker = start_worker(settings)
    produce(settings, events)
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    latest = latest_until_caught_up(reader, events)
    user = events[-1]["user_id"]
    shown = [i["item_id"] for i in latest[user]["items"]]
    no = {"event_id": "no-1", "user_id": user, "type": "dismiss", "item_id": shown[0], "ts": events[-1]["ts"] + 1}
    bad = {"event_id": "no-2", "user_id": user, "type": "dismiss", "ts": events[-1]["ts"] + 2}
    produce(settings, [no, bad])
    latest = latest_until_caught_up(reader, events + [no], latest=latest)
    assert shown[0] not in [i["item_id"] for i in latest[user]["items"]]
    model, meta = checkpoint.load(str(ckpt))
    assert_parity(model, [e for e in events if e["user_id"] == user] + [no], {user: latest[user]}, meta["version"])
    dlq = TopicReader(settings.bootstrap_servers, settings.dlq_topic)
    dead = dlq.read_until(lambda rs: len(rs) >= 1, timeout=30)
    headers = dict(dead[0].headers)
    assert len(dead) == 1 and json.loads(dead[0].value) == bad
    assert (headers["streamrec-reason"], headers["streamrec-detail"]) == (b"missing_field", b"item_id")
    m = worker.metrics()
    assert m['streamrec_events_total{type="dismiss"}'] == sum(e["type"] == "dismiss" for e in events) + 1
    assert m['streamrec_invalid_events_total{reason="missing_field"}'] == 1
    for r in (reader, dlq):
        r.close()


def test_tiny_cache_and_hot_swap_mid_stream(world, make_settings, start_worker, tmp_path):
    events, catalog_rows, ckpt = world
    models = tmp_path / "models"
    shutil.copytree(ckpt, models / "v1")
    v2 = train_tiny(tmp_path / "staging" / "v2", events, catalog_rows, seed=7)
    model2, meta2 = checkpoint.load(str(v2))
    # a few slots for 120 users: nearly every refresh is an eviction + rebuild
    settings = make_settings(model_dir=models, history_max=HISTORY, cache_mb=0.001, model_poll_s=0.5)
    worker = start_worker(settings)
    half = len(events) // 2
    produce(settings, events[:half])
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    latest = latest_until_caught_up(reader, events[:half])
    shutil.copytree(v2, models / "v2")  # newest checkpoint in the watched dir
    produce(settings, events[half:half + 200])  # events in flight during the swap
    deadline = time.monotonic() + 30
    while worker.metrics().get("streamrec_model_swaps_total", 0) < 1:
        assert time.monotonic() < deadline, "model not swapped"
        time.sleep(0.2)
    produce(settings, events[half + 200:])
    latest = latest_until_caught_up(reader, events, latest=latest)
    users_after = {e["user_id"] for e in events[half + 200:]}
    m = worker.metrics()
    assert metric_sum(m, "streamrec_events_total") == len(events)  # nothing lost, nothing doubled
    assert m["streamrec_cache_evictions_total"] > 100
    touched = [e for e in events if e["user_id"] in users_after]
    assert_parity(model2, touched, {u: latest[u] for u in users_after}, meta2["version"])
    assert m[f'streamrec_model_info{{variant="default",version="{meta2["version"]}"}}'] == 1
    reader.close()
