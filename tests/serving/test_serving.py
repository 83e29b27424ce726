"""Model serving inside the batch processor, without Kafka: exact parity with the offline
forward pass under random batch compositions, evictions and rebuilds; catalog; forget."""
from __future__ import annotations

import json
import random

import pytest

from stream_app.pipeline.catalog import Catalog
from stream_app.config import Settings
from stream_app.serving.lifecycle import Lifecycle
from stream_app.serving.model_recommender import ModelRecommender
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.pipeline.state import UserState
from tests.helpers import assert_same_ranking, offline_recommend


def messages(events):
    return [Message(e["user_id"].encode(), json.dumps(e).encode(), 0.0) for e in events]


@pytest.mark.parametrize("cache_mb", [64.0, 0.0001])  # roomy, and one slot: nearly every refresh rebuilds
def test_streaming_equals_offline_forward(world, cache_mb, tmp_path):
    events, _, ckpt = world
    settings = Settings(model_dir=ckpt, cache_mb=cache_mb, history_max=60, top_k=10)
    lifecycle = Lifecycle(settings)
    engine = lifecycle.recommender
    assert isinstance(engine, ModelRecommender)  # the transformer answers, not the fallback
    assert (engine.n_slots == 1) == (cache_mb < 0.001)
    proc = BatchProcessor(settings, engine)
    store: dict[str, dict] = {}
    rng = random.Random(3)
    pos, checked, worst = 0, 0, 0.0
    while pos < 4500:
        size = rng.choice([1, 2, 7, 50, 200])
        batch = events[pos:pos + size]
        pos += size
        if rng.random() < 0.1:  # redeliveries ride along
            batch = batch + events[max(0, pos - 30):pos - 25]
        out = proc.process(messages(batch), store.get)
        for user, (_, value) in out.writes.items():
            store[user] = value
        if not out.recommendations:
            continue
        refs = offline_recommend(engine.model, [UserState.from_json(store[u]) for u, _ in out.recommendations], 10)
        for (user, record), expected in zip(out.recommendations, refs):
            got = [(i["item_id"], i["score"]) for i in record["items"]]
            assert_same_ranking(got, expected)
            worst = max(worst, max(abs(a[1] - b[1]) for a, b in zip(got, expected)))
            checked += 1
    assert checked > 300 and worst <= 1e-4, (checked, worst)


def test_catalog_upserts_and_availability(world):
    events, catalog_rows, ckpt = world
    catalog = Catalog()
    lifecycle = Lifecycle(Settings(model_dir=ckpt, history_max=60), catalog)
    engine = lifecycle.recommender
    proc = BatchProcessor(Settings(history_max=60), engine)
    store: dict[str, dict] = {}
    out = proc.process(messages(events[:300]), store.get)
    for user, (_, value) in out.writes.items():
        store[user] = value
    # a brand-new item, then everything else unavailable: the new item is all that is left
    assert catalog.apply(b"i-new", json.dumps({"item_id": "i-new", "title": "Acme wireless mouse",
                                               "category": catalog_rows[0]["category"]}).encode())
    for row in catalog_rows:
        catalog.apply(row["item_id"].encode(), json.dumps({**row, "available": False}).encode())
    ranked = engine.recommend([r for r in _refreshes(store, events[300:320], proc)], k=5)
    assert ranked and all([i for i, _ in r.items] == ["i-new"] for r in ranked)
    # available again -> recommendable again
    catalog.apply(catalog_rows[0]["item_id"].encode(), json.dumps({**catalog_rows[0], "available": True}).encode())
    ranked = engine.recommend([r for r in _refreshes(store, events[320:330], proc)], k=5)
    assert all(set(i for i, _ in r.items) <= {"i-new", catalog_rows[0]["item_id"]} for r in ranked)


def _refreshes(store, evs, proc):
    from stream_app.serving.recommender import Refresh
    users = {e["user_id"] for e in evs if e["user_id"] in store}
    return [Refresh(u, UserState.from_json(store[u]), ()) for u in sorted(users)]


def test_forget_drops_state_cache_and_latest(world):
    events, _, ckpt = world
    settings = Settings(model_dir=ckpt, history_max=60)
    engine = Lifecycle(settings).recommender
    proc = BatchProcessor(settings, engine)
    store: dict[str, dict] = {}
    user = events[0]["user_id"]
    mine = [e for e in events if e["user_id"] == user][:5]
    out = proc.process(messages(mine), store.get)
    store[user] = out.writes[user][1]
    assert proc.latest.get(user) and engine.slots.lookup(user)
    forget = {"event_id": "f1", "user_id": user, "type": "forget", "ts": mine[-1]["ts"]}
    out = proc.process(messages([forget]), store.get)
    assert out.forgets == {user: 0} and not out.writes and not out.recommendations
    assert proc.latest.get(user) is None and engine.slots.lookup(user) is None


def test_history_shorter_than_receptive_field_is_refused(world):
    from stream_app.errors import UserError
    _, _, ckpt = world
    with pytest.raises(UserError, match="STREAMREC_HISTORY_MAX"):
        Lifecycle(Settings(model_dir=ckpt, history_max=5))


def test_ab_split_is_stable_and_labels_every_record(world):
    from stream_app.serving.lifecycle import variant_of

    events, _, ckpt = world
    settings = Settings(model_dir=ckpt, model_b_dir=ckpt, ab_split=0.5, history_max=60)
    proc = BatchProcessor(settings, Lifecycle(settings).recommender)
    store: dict[str, dict] = {}
    unknown = {"event_id": "x1", "user_id": "newcomer", "type": "view", "item_id": "never-seen", "ts": events[0]["ts"]}
    out = proc.process(messages(events[:800] + [unknown]), store.get)  # "newcomer" is served by the fallback
    variants = {user: rec["variant"] for user, rec in out.recommendations}
    assert set(variants.values()) == {"A", "B"}
    assert all(v == variant_of(u, 0.5) for u, v in variants.items())
    assert variants["newcomer"] == variant_of("newcomer", 0.5)


def test_a_checkpoint_from_before_dismiss_serves_and_a_dismiss_hides_the_item(world, tmp_path):
    """A deployed model trained before `dismiss` existed (5 type rows) keeps serving through
    the transformer, exactly as offline; the dismissed item leaves the user's list at once."""
    import shutil

    from model import checkpoint
    from tests.helpers import with_type_rows

    events, _, ckpt = world
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    with_type_rows(old, 5)
    settings = Settings(model_dir=old, history_max=60)
    engine = Lifecycle(settings).recommender
    assert isinstance(engine, ModelRecommender) and not engine.model.type_emb.weight[5].any()
    proc = BatchProcessor(settings, engine)
    store: dict[str, dict] = {}
    user = events[0]["user_id"]
    mine = [e for e in events if e["user_id"] == user and e["type"] != "dismiss"][:8]
    out = proc.process(messages(mine), store.get)
    store[user] = out.writes[user][1]
    top = dict(out.recommendations)[user]["items"][0]["item_id"]
    no = {"event_id": "no-1", "user_id": user, "type": "dismiss", "item_id": top, "ts": mine[-1]["ts"] + 1}
    out = proc.process(messages([no]), store.get)
    record = dict(out.recommendations)[user]
    state = UserState.from_json(out.writes[user][1])
    assert record["model_version"] == checkpoint.load(str(old))[1]["version"]
    assert top not in [i["item_id"] for i in record["items"]]
    assert_same_ranking([(i["item_id"], i["score"]) for i in record["items"]],
                        offline_recommend(engine.model, [state], 10)[0])
