"""Evaluation protocols against hand-built cases whose ranks are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.data import Split, leave_one_out, load
from model.evaluate import baseline_fit_data, baseline_scorer, evaluate, rank_metrics, sample_negatives
from model.features import RawEvent
from stream_app.errors import UserError


def test_rank_metrics_known_ranks() -> None:
    m = rank_metrics(np.array([0, 3, 12]), np.array([0, 0, 0]), k=10)
    assert m["hr"] == pytest.approx(2 / 3)
    assert m["ndcg"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    # a tie with one other item: rank 0 or 1 with probability 1/2 each
    t = rank_metrics(np.array([0]), np.array([1]), k=10)
    assert t["ndcg"] == pytest.approx((1 + 1 / math.log2(3)) / 2) and t["mrr"] == pytest.approx(0.75)
    # tie straddling the cut-off: positions 9, 10, 11 -> only 9 is a hit
    assert rank_metrics(np.array([9]), np.array([2]), k=10)["hr"] == pytest.approx(1 / 3)


@pytest.fixture()
def tiny(tmp_path):
    """User a: 5 items; user b: search + 3 items; user c: 2 items (not evaluated)."""
    items = [f"x{i}" for i in range(150)]
    lines = [f"a {i}" for i in ("x5", "x1", "x7", "x2", "x40")] + ["b x3", "b x9", "b x0"] + ["c x8", "c x149"]
    lines += [f"z{n} x{n}" for n in range(10, 150)]  # make every item exist in the data
    p = tmp_path / "tiny.txt"
    p.write_text("\n".join(lines) + "\n")
    return load(str(p), "pairs"), items


def test_leave_one_out_and_full_protocol(tiny) -> None:
    ds, _ = tiny
    train, valid, test = leave_one_out(ds)
    a = ds.users.index("a")
    assert [s.target for s in test if s.user == a] == ["x40"] and [s.target for s in valid if s.user == a] == ["x2"]
    assert [e.item_id for e in train[a]] == ["x5", "x1", "x7"]
    assert "c" not in {ds.users[s.user] for s in test}
    # score = -index in ds.items: item at position p is beaten by exactly the earlier items
    pos = {iid: p for p, iid in enumerate(ds.items)}
    score = lambda ctx, cand: (-np.arange(len(ds.items), dtype=float)[None].repeat(len(ctx), 0)
                               if cand is None else -cand.astype(float))
    res = evaluate(score, test, ds.items, "full", k=10)
    expect = []
    for s in test:  # rank among all items minus the user's other interactions
        others = {pos[i] for i in s.seen} - {pos[s.target]}
        expect.append(sum(1 for p in range(pos[s.target]) if p not in others))
    assert res["users"] == len(test) == 2 + 0  # only a and b have >= 3 interactions
    assert res["mrr"] == pytest.approx(np.mean([1 / (r + 1) for r in expect]))


def test_sampled_protocol_negatives(tiny) -> None:
    ds, _ = tiny
    _, _, test = leave_one_out(ds)
    index = {iid: i for i, iid in enumerate(ds.items)}
    n1 = sample_negatives(test, index, 100, seed=0)
    assert (n1 == sample_negatives(test, index, 100, seed=0)).all()
    assert not (n1 == sample_negatives(test, index, 100, seed=1)).all()
    for row, s in zip(n1, test):
        assert len(set(row.tolist())) == 100 and not {ds.items[i] for i in row} & s.seen
    score = lambda ctx, cand: -np.arange(len(ds.items), dtype=float)[None].repeat(len(ctx), 0) if cand is None else -cand.astype(float)
    res = evaluate(score, test, ds.items, "sampled", k=10, seed=0)
    ranks = [int((n1[r] < index[s.target]).sum()) for r, s in enumerate(test)]
    assert res["hr"] == pytest.approx(np.mean([r < 10 for r in ranks]))
    assert res["mrr"] == pytest.approx(np.mean([1 / (r + 1) for r in ranks]))


def test_popularity_baseline_ties_are_fair(tiny) -> None:
    ds, _ = tiny
    _, _, test = leave_one_out(ds)
    sc = baseline_scorer("popularity", baseline_fit_data(ds), ds.items)
    res = evaluate(sc, test, ds.items, "full", k=10)
    assert 0 < res["hr"] < 1  # nearly all items are tied at count 1: chance level, not rank 1
    co = evaluate(baseline_scorer("cooccurrence", baseline_fit_data(ds), ds.items), test, ds.items, "sampled")
    assert set(co) >= {"protocol", "k", "users", "hr", "ndcg", "mrr"}


def test_jsonl_loading_sorts_and_skips(tmp_path) -> None:
    rows = [
        {"event_id": "1", "user_id": "u", "type": "click", "item_id": "b", "ts": "2026-01-01T00:00:10Z"},
        {"event_id": "2", "user_id": "u", "type": "view", "item_id": "a", "ts": 1767225600},
        {"event_id": "3", "user_id": "u", "type": "search", "query": "red", "ts": 1767225605},
        {"event_id": "4", "user_id": "u", "type": "teleport", "item_id": "c", "ts": 1767225606},
    ]
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    ds = load(str(p))
    assert ds.format == "jsonl" and ds.skipped == 2
    assert ds.histories[0] == [RawEvent("a", "view", 1767225600.0), RawEvent(None, "search", 1767225605.0, "red"),
                               RawEvent("b", "click", 1767225610.0)]


def test_user_errors(tmp_path) -> None:
    with pytest.raises(UserError):
        load(str(tmp_path / "missing.txt"))
    p = tmp_path / "e.txt"
    p.write_text("a b\n")
    with pytest.raises(UserError):
        load(str(p), "csv")
    with pytest.raises(UserError):
        load(str(p), "jsonl")


def test_lists_with_rules_are_the_full_protocol_without_them(tiny) -> None:
    """evaluate_lists: no rules = the full protocol (no ties here); rules drop the target
    when they forbid it, and the independent check finds no violation."""
    from model.evaluate import evaluate_lists
    from model.rules import Rules

    ds, _ = tiny
    _, _, test = leave_one_out(ds)
    score = lambda ctx, cand: -np.arange(len(ds.items), dtype=float)[None].repeat(len(ctx), 0)  # noqa: E731
    plain = evaluate(score, test, ds.items, "full", k=10)
    lists = evaluate_lists(score, test, ds.items, 10, lambda i: Rules(), {}, 100)
    assert (lists["hr"], lists["ndcg"], lists["users"]) == pytest.approx((plain["hr"], plain["ndcg"], plain["users"]))
    meta = {iid: {"category": "even" if n % 2 == 0 else "odd", "price": float(n)} for n, iid in enumerate(ds.items)}
    odd = evaluate_lists(score, test, ds.items, 10, lambda i: Rules(categories=("odd",), max_per_category=3), meta, 100)
    assert odd["violations"] == 0 and odd["short_lists"] == odd["users"]  # 3 odd items a list: never 10
    targets = {s.target for s in test}
    assert odd["hr"] <= sum(meta[t]["category"] == "odd" for t in targets) / len(test)


def test_last_item_splits_ask_the_item_page_question(tiny) -> None:
    from model.evaluate import last_item_splits

    ds, _ = tiny
    _, _, test = leave_one_out(ds)
    cut = last_item_splits(test)
    a = next(s for s in cut if ds.users[s.user] == "a")
    assert [(e.item_id, e.type) for e in a.context] == [("x2", "click")] and a.target == "x40" and a.seen == {"x2"}
    # a dismiss is not the item the user is on
    no = Split(0, a.context + [RawEvent("x9", "dismiss", 1.0)], "x40", {"x2"})
    assert [e.item_id for e in last_item_splits([no])[0].context] == ["x2"]
