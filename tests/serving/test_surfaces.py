"""Surfaces (stream_app/serving/surfaces.py) and what the served recommenders answer for
them: the configuration file and its one-line errors; similar items and the list after a
search equal to the offline model; rules on published lists never broken and equal to the
offline ranking with the same rules; a reason on every published item."""
from __future__ import annotations

import json

import pytest
import torch

from model.cache import masked_topk
from model.features import RawEvent
from model.rules import Boost, Rules, apply, violations
from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.pipeline.catalog import Catalog
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.pipeline.state import UserState
from stream_app.serving.lifecycle import Lifecycle
from stream_app.serving.recommender import CoOccurrenceRecommender, Refresh
from stream_app.serving.surfaces import OUTPUT, load
from tests.helpers import assert_same_ranking

GOOD = """
[surfaces.for_you]
kind = "user"
rules = { max_per_category = 3, boost = [{ attribute = "brand", value = "acme", weight = 0.5 }] }

[surfaces.similar]
kind = "similar"
k = 12
rules = { exclude_categories = ["gift cards"], price_max = 100 }

[surfaces.deals]
kind = "trending"
rules = { price_max = 20 }
"""


def test_default_and_configured_surfaces(tmp_path):
    assert {s.name: s.kind for s in load(None, 10).values()} == {
        "for_you": "user", "similar": "similar", "trending": "trending", "after_search": "search"}
    path = tmp_path / "surfaces.toml"
    path.write_text(GOOD)
    got = load(path, 10)
    assert got[OUTPUT].k == 10 and got[OUTPUT].rules == Rules(max_per_category=3, boost=(Boost("brand", "acme", 0.5),))
    assert got["similar"].k == 12 and got["similar"].rules == Rules(exclude_categories=("gift cards",), price_max=100)
    assert got["deals"].kind == "trending" and "after_search" not in got
    path.write_text('[surfaces.similar]\nkind = "similar"\n')
    assert set(load(path, 5)) == {"similar", OUTPUT}  # the published list always exists


@pytest.mark.parametrize("text, words", [
    ("[surfaces", "not valid TOML"),
    ('[surfaces.x]\nkind = "users"', "surfaces.x.kind"),
    ('[surfaces.x]\nkind = "user"\nk = 0', "surfaces.x.k"),
    ('[surfaces.x]\nkind = "user"\nrules = { max_per_category = -1 }', "max_per_category"),
    ('[surfaces.x]\nkind = "user"\nrules = { price_min = 5, price_max = 1 }', "price_min 5 is above"),
    ('[surfaces.x]\nkind = "user"\nrules = { boost = [{ attribute = "b", value = "v", weight = 20 }] }', "weight"),
    ('[surfaces.x]\nkind = "user"\nrules = { colour = "red" }', "colour"),
    ('[surfaces.x]\nkind = "user"\ncolour = 1', "colour"),
    ('[surfaces."a b"]\nkind = "user"', "rename it"),
    ('[surfaces.for_you]\nkind = "similar"', "published list"),
    ('[surfaces.for_you]\nkind = "user"\nk = 5', "STREAMREC_TOP_K"),
    ('title = "x"', "surfaces"),
])
def test_a_bad_file_is_one_line_naming_the_fix(tmp_path, text, words):
    path = tmp_path / "surfaces.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load(path, 10)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert any(fix in message for fix in ("fix the file", "rename it", "STREAMREC_TOP_K")), message
    with pytest.raises(UserError, match="cannot read"):
        load(tmp_path / "missing.toml", 10)


def served(world, **settings):
    events, catalog_rows, ckpt = world
    catalog = Catalog()
    for row in catalog_rows:
        catalog.apply(row["item_id"].encode(), json.dumps({**row, "attributes": {"brand": row["title"].split()[0]}})
                      .encode())
    engine = Lifecycle(Settings(model_dir=ckpt, history_max=60, **settings), catalog).recommender
    return engine, catalog


def states_of(world, n_events: int = 1500) -> dict[str, UserState]:
    events = world[0]
    proc = BatchProcessor(Settings(history_max=60), CoOccurrenceRecommender())
    store: dict = {}
    out = proc.process([Message(e["user_id"].encode(), json.dumps(e).encode(), 0.0) for e in events[:n_events]],
                       store.get)
    return {u: UserState.from_json(v) for u, (_, v) in out.writes.items()}


def offline(model, histories, recent, exclude, k):
    """The reference: a full forward over each history, the served score, top-k."""
    with torch.no_grad():
        u = model.user_vectors(histories, truncate=False)
        scores, idx = masked_topk(model.scores(u, model.recent_items(recent)), k, exclude)
    return [[(model.items.ids[i], s) for i, s in zip(ri, rs)] for ri, rs in zip(idx.tolist(), scores.tolist())]


def test_similar_is_the_served_score_of_a_one_event_history(world):
    engine, catalog = served(world)
    model = engine.model
    for item in [r["item_id"] for r in world[1][:20:4]]:
        got = engine.similar(item, 10)
        want = offline(model, [[RawEvent(item, "click", 0.0)]], [[item]], [[model.items.lookup(item)]], 10)[0]
        assert_same_ranking(got.items, want)
        assert item not in [i for i, _ in got.items]
        assert all(r in (f"follows:{item}", f"like:{item}") for r in got.reasons), got.reasons


def test_a_catalog_item_added_now_has_neighbours_by_its_content(world):
    engine, catalog = served(world)
    row = world[1][0]
    assert engine.similar("i-brand-new", 5).model_version == "cooccurrence-v1"  # unknown everywhere: the fallback
    catalog.apply(b"i-brand-new", json.dumps({"title": row["title"] + " v2", "category": row["category"]}).encode())
    got = engine.similar("i-brand-new", 5)
    assert len(got.items) == 5 and "i-brand-new" not in [i for i, _ in got.items]
    assert got.model_version == engine.version  # the model answers, through the content vector


def test_after_search_is_the_history_plus_that_search(world):
    engine, _ = served(world)
    model = engine.model
    states = states_of(world)
    for user, state in list(states.items())[:8]:
        got = engine.after_search(Refresh(user, state, ()), "wireless earbuds", 1767300000.0, 10)
        history = state.raw_events() + [RawEvent(None, "search", 1767300000.0, "wireless earbuds")]
        exclude = [[i for i in map(model.items.lookup, state.seen_items(*Settings().seen_policy)) if i]]
        want = offline(model, [history], [state.items()], exclude, 10)[0]
        assert_same_ranking(got.items, want)
        meta = model.items.meta
        for (item, _), why in zip(got.items, got.reasons):
            title = (meta.get(item) or {}).get("title", "").lower()
            assert why.startswith("search:") == ("wireless" in title or "earbuds" in title), (item, title, why)


@pytest.mark.parametrize("rules", [Rules(max_per_category=1), Rules(categories=("audio", "computing"), price_max=60),
                                   Rules(boost=(Boost("category", "sports", 1.0),), exclude_categories=("home",))])
def test_rules_on_users_lists_are_never_broken_and_equal_offline(world, rules):
    engine, catalog = served(world)
    model = engine.model
    states = states_of(world)
    users = sorted(states)[:30]
    ranked = engine.recommend([Refresh(u, states[u], ()) for u in users], 10, rules)
    pool = engine.rules_pool
    for user, got in zip(users, ranked):
        state = states[user]
        assert not violations([i for i, _ in got.items], rules, catalog.meta)
        exclude = [[i for i in map(model.items.lookup, state.seen_items(*Settings().seen_policy)) if i]]
        want = apply(offline(model, [state.raw_events()], [state.items()], exclude, pool)[0], rules, catalog.meta, 10)
        assert [i for i, _ in got.items] == [i for i, _ in want] or \
            max(abs(a[1] - b[1]) for a, b in zip(got.items, want)) < 1e-4


def test_published_records_carry_a_reason_per_item(world):
    events = world[0]
    engine, _ = served(world)
    proc = BatchProcessor(Settings(history_max=60), engine, rules=Rules(max_per_category=2))
    out = proc.process([Message(e["user_id"].encode(), json.dumps(e).encode(), 0.0) for e in events[:600]], {}.get)
    kinds = set()
    for _, record in out.recommendations:
        assert record["items"] and all(i["reason"] for i in record["items"])
        kinds |= {i["reason"].split(":")[0] for i in record["items"]}
    assert kinds <= {"search", "follows", "like", "popular"} and {"like"} <= kinds
    quiet, _ = served(world, reasons=False)
    out = BatchProcessor(Settings(history_max=60), quiet).process(
        [Message(e["user_id"].encode(), json.dumps(e).encode(), 0.0) for e in events[:50]], {}.get)
    assert all("reason" not in i for _, r in out.recommendations for i in r["items"])
