"""The synthetic clickstream: contract-valid, deterministic, and carrying the planted signals
(query/title overlap, sequential structure) that downstream models are tested against."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from itertools import islice

import pytest

from stream_app import cli
from stream_app.pipeline.events import EVENT_TYPES, validate
from stream_app.testing.synth import catalog, generate, item_sequences, stream

USERS, ITEMS, EVENTS = 300, 500, 30_000


@pytest.fixture(scope="module")
def data():
    return generate(USERS, ITEMS, EVENTS, seed=3)


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z]+", text.lower()) if w}


def test_deterministic_per_seed():
    a, ca = generate(50, 80, 3000, seed=11)
    b, cb = generate(50, 80, 3000, seed=11)
    c, _ = generate(50, 80, 3000, seed=12)
    assert json.dumps(a) == json.dumps(b) and ca == cb
    assert [e.get("item_id") for e in a] != [e.get("item_id") for e in c]


def test_events_valid_unique_and_time_ordered(data):
    events, _ = data
    assert len(events) == EVENTS
    for e in events:
        validate(e)
    assert len({e["event_id"] for e in events}) == EVENTS
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)  # global order implies per-user order
    assert ts[0] >= 1_767_225_600  # fixed base, not the wall clock


def test_catalog_matches_and_items_known(data):
    events, rows = data
    assert rows == catalog(ITEMS, seed=3)
    assert [r["item_id"] for r in rows] == [f"i{n}" for n in range(ITEMS)]
    assert all(set(r) == {"item_id", "title", "category", "price"} and r["price"] > 0 for r in rows)
    assert 10 <= len({r["category"] for r in rows}) <= 20
    ids = {r["item_id"] for r in rows}
    assert all(e["item_id"] in ids for e in events if e["type"] != "search")


def test_type_mix_and_funnel(data):
    events, _ = data
    n = Counter(e["type"] for e in events)
    assert set(n) == set(EVENT_TYPES)
    assert n["purchase"] < n["add_to_cart"] < n["click"] < n["view"]
    viewed = defaultdict(set)  # purchases are of items viewed in the same session
    for e in events:
        if e["type"] == "view":
            viewed[e["session_id"]].add(e["item_id"])
        elif e["type"] == "purchase":
            assert e["item_id"] in viewed[e["session_id"]]


def test_dismisses_are_a_small_share_of_items_from_categories_the_user_ignores(data):
    """A dismissed item's category holds a tiny share of the user's own engagement, a viewed
    item's a large one: the model can learn what a dismiss says."""
    events, rows = data
    category = {r["item_id"]: r["category"] for r in rows}
    engaged: dict[str, Counter] = defaultdict(Counter)
    for e in events:
        if e["type"] not in ("search", "dismiss"):
            engaged[e["user_id"]][category[e["item_id"]]] += 1

    def share(kind: str) -> float:
        chosen = [e for e in events if e["type"] == kind]
        return sum(engaged[e["user_id"]][category[e["item_id"]]] / max(1, engaged[e["user_id"]].total())
                   for e in chosen) / len(chosen)

    dismisses = sum(e["type"] == "dismiss" for e in events)
    assert 0.01 < dismisses / len(events) < 0.05
    assert share("dismiss") < 0.1 < 0.25 < share("view"), (share("dismiss"), share("view"))
    # the `pairs` format has no types: dismisses are not interactions there
    assert item_sequences(events) == item_sequences([e for e in events if e["type"] != "dismiss"])


def test_time_gaps_seconds_within_hours_between_sessions(data):
    events, _ = data
    within, between, last = [], [], {}
    for e in events:
        if e["user_id"] in last:
            ts, sid = last[e["user_id"]]
            (within if sid == e["session_id"] else between).append(e["ts"] - ts)
        last[e["user_id"]] = (e["ts"], e["session_id"])
    within.sort(), between.sort()
    assert within[len(within) // 2] < 60 and min(between) >= 1800
    assert between[len(between) // 2] > 3 * 3600


def test_search_queries_match_titles_then_viewed(data):
    events, rows = data
    titles = {r["item_id"]: _words(r["title"]) for r in rows}
    pending, hits, chance, n = {}, 0, 0, 0
    items = list(titles)
    for e in events:
        if e["type"] == "search":
            pending[e["session_id"]] = _words(e["query"])
        elif e["type"] == "view" and e["session_id"] in pending:
            query = pending.pop(e["session_id"])
            hits += bool(query & titles[e["item_id"]])
            chance += bool(query & titles[items[(n * 7919) % len(items)]])
            n += 1
    assert n > 500
    assert hits / n > 0.7 and hits / n > 3 * chance / n, (hits / n, chance / n)


def _hit_at_10(seqs: dict[str, list[str]]) -> tuple[float, float]:
    """First-order 'most frequent next item' vs global popularity, 80/20 split per user."""
    trans: dict[str, Counter] = defaultdict(Counter)
    pop: Counter = Counter()
    tests = []
    for seq in seqs.values():
        k = int(len(seq) * 0.8)
        if k < 1 or k == len(seq):
            continue
        pop.update(seq[:k])
        for a, b in zip(seq[: k - 1], seq[1:k]):
            trans[a][b] += 1
        tests += zip(seq[k - 1 : -1], seq[k:])
    top = [i for i, _ in pop.most_common(10)]
    markov = popular = 0
    for prev, nxt in tests:
        pred = [i for i, _ in trans[prev].most_common(10)]
        pred += [i for i in top if i not in pred][: 10 - len(pred)]
        markov += nxt in pred
        popular += nxt in top
    return markov / len(tests), popular / len(tests)


def test_sequential_structure_beats_popularity(data):
    markov, popular = _hit_at_10(item_sequences(data[0]))
    # measured (seed 3, 300 users, 500 items, 30k events): markov ~0.71, popularity ~0.21
    assert markov > 0.55 and markov > popular + 0.3, (markov, popular)


def test_stream_is_the_same_world_and_endless():
    events, _ = generate(20, 40, 500, seed=5)
    assert list(islice(stream(20, 40, seed=5), 500)) == events
    more = list(islice(stream(20, 40, seed=5), 5000))
    assert len(more) == 5000 and all(validate(e) for e in more[-50:])


def test_cli_jsonl_and_catalog(tmp_path, capsys):
    out, cat = tmp_path / "ev.jsonl", tmp_path / "cat.jsonl"
    argv = ["synth", "--users", "30", "--items", "60", "--events", "2000", "--seed", "4"]
    assert cli.main(argv + ["--out", str(out), "--catalog", str(cat)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2000 and all(validate(json.loads(line)) for line in lines)
    assert [json.loads(line) for line in cat.read_text().splitlines()] == catalog(60, seed=4)
    summary = capsys.readouterr().out
    assert "2000 events" in summary and "purchase" in summary
    again = tmp_path / "again.jsonl"
    assert cli.main(argv + ["--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_pairs(tmp_path):
    out = tmp_path / "pairs.txt"
    assert cli.main(["synth", "--users", "30", "--items", "60", "--events", "2000", "--seed", "4",
                     "--format", "pairs", "--out", str(out)]) == 0
    events, _ = generate(30, 60, 2000, seed=4)
    expected = item_sequences(events)
    got = defaultdict(list)
    users_in_order = []
    for line in out.read_text().splitlines():
        user, item = line.split()
        if not users_in_order or users_in_order[-1] != user:
            users_in_order.append(user)
        got[user].append(item)
    assert dict(got) == expected
    assert len(users_in_order) == len(set(users_in_order))  # each user's lines contiguous


@pytest.mark.parametrize("extra, message", [
    (["--events", "0"], "--events must be at least 1"),
    (["--users", "-1"], "--users must be at least 1"),
    (["--out", "/nonexistent-dir/x.jsonl"], "does not exist"),
])
def test_cli_user_errors(tmp_path, capsys, extra, message):
    argv = ["synth", "--out", str(tmp_path / "x.jsonl"), "--events", "10"] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
