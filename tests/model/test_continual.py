"""The continual learner's pure logic (model/continual.py, model/vocab.py,
model/prequential.py): test-then-train order, bounded memory, the gate, vocabulary
growth that leaves the parent's function unchanged, and the offline protocol's JSON."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import LearnConfig, ModelConfig
from model.continual import EVENT_BYTES, Learner, rank_targets
from model.features import ItemIndex, RawEvent
from model.prequential import read_events, replay
from model.synthetic import drifting_stream
from model.transformer import SeqRec
from model.vocab import grow, neighbours

SEEN = ("interacted", 0)


def tiny_model(items: list[str], catalog: dict | None = None, seed: int = 0) -> SeqRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=len(items), dim=16, n_layers=1, n_heads=2, window=8, dropout=0.0,
                      content_buckets=64 if catalog else 2, query_buckets=2, gap_buckets=1)
    return SeqRec(cfg, ItemIndex(items, cfg, catalog)).eval()


def stream(users: int = 60, items: int = 40, events: int = 3000, **kw) -> list[tuple[str, RawEvent]]:
    return [(u, RawEvent(i, "click", ts)) for u, i, ts in drifting_stream(users, items, events, seed=1, **kw)]


def test_grown_model_computes_the_parents_function_on_old_items():
    model = tiny_model([f"i{n}" for n in range(20)])
    hist = [[RawEvent(f"i{n % 20}") for n in range(k, k + 9)] for k in range(5)]
    near = neighbours([[RawEvent("i1"), RawEvent("new"), RawEvent("i2")]], {"new"})
    grown = grow(model, ["new", "i3"], near)  # i3 is already trained: ignored
    assert grown.cfg.n_items == 21 and grown.items.index["new"] == 21
    assert torch.allclose(grown.user_vectors(hist), model.user_vectors(hist), atol=1e-6)
    old_rows = grown.item_matrix()[:21]
    assert torch.allclose(old_rows, model.item_matrix()[:21], atol=1e-6)
    # no content: the new row is the mean of its neighbours' ID rows
    w = model.id_emb.weight
    assert torch.allclose(grown.id_emb.weight[21], (w[model.items.index["i1"]] + w[model.items.index["i2"]]) / 2)


def test_grown_item_with_content_keeps_its_content_vector():
    cat = {f"i{n}": {"title": f"thing {n}", "category": "a"} for n in range(10)}
    cat["fresh"] = {"title": "fresh thing", "category": "b"}
    model = tiny_model([f"i{n}" for n in range(10)], cat)
    before = model.item_matrix()[model.items.index["fresh"]]
    grown = grow(model, ["fresh"])
    assert grown.items.index["fresh"] <= grown.items.n_trained
    assert torch.allclose(grown.item_matrix()[grown.items.index["fresh"]], before, atol=1e-6)


def test_rank_targets_misses_unknown_and_seen_items():
    model = tiny_model([f"i{n}" for n in range(10)])
    ctx = [[RawEvent("i1"), RawEvent("i2")]] * 3
    greater, ties = rank_targets(model, ctx, ["i3", "nope", "i2"], SEEN)
    n = len(model.items)
    assert greater[0] < n and greater[1] == n and greater[2] == n  # unknown and already seen: misses
    assert ties[0] == 0


def test_events_are_tested_before_they_train_and_memory_is_bounded():
    items = [f"i{n}" for n in range(40)]
    cfg = LearnConfig(memory_mb=200 * EVENT_BYTES / 0.75 / 1e6, history=30, every_events=500, min_events=100,
                      update_s=5.0)
    lr = Learner(tiny_model(items), cfg, SEEN)
    events = stream()
    for n, (u, e) in enumerate(events[:600]):
        lr.observe(u, e, e.ts)
        assert lr.kept <= lr.recent_budget
        if lr.due(e.ts):
            scored_before = (lr.metrics["serving"].count if lr.metrics else 0) + len(lr.pending)
            report = lr.update(e.ts)
            # every item event with history was scored before the update trained on it
            assert lr.metrics["serving"].count == scored_before and not lr.pending
            assert report["events"] >= cfg.min_events
    assert lr.recent_budget == 200 and lr.updates >= 1 and len(lr.users) < 60  # some users left for replay
    assert 0 < len(lr.replay) <= lr.replay_slots


def test_gate_publishes_only_a_better_candidate():
    items = [f"i{n}" for n in range(40)]
    published = []
    cfg = LearnConfig(every_events=400, min_events=100, update_s=10.0, epochs=3, lr=5e-3, margin=0.0)
    lr = Learner(tiny_model(items), cfg, SEEN, publish=lambda m, r: published.append(r) or f"v{len(published)}")
    for u, e in stream(events=2400):
        lr.observe(u, e, e.ts)
        if lr.due(e.ts):
            report = lr.update(e.ts)
            gate = report["gate"]
            if report["published"]:
                assert gate["candidate_ndcg"] > gate["serving_ndcg"] and report["version"] == f"v{len(published)}"
                assert lr.serving is lr.candidate
            else:
                assert report["reason"] in ("not_better", "no_holdout") and lr.serving is not lr.candidate
    assert lr.updates >= 4 and published, "a random model fine-tuned on its stream never beat itself"
    impossible = Learner(tiny_model(items), replace(cfg, margin=1.0), SEEN, publish=lambda m, r: "never")
    for u, e in stream(events=600):
        impossible.observe(u, e, e.ts)
    assert not impossible.update(1e10)["published"]


def test_new_items_join_the_vocabulary_after_min_item_events():
    items = [f"i{n}" for n in range(40)]
    cfg = LearnConfig(every_events=10**6, min_events=1, update_s=2.0, min_item_events=3, margin=-1.0)
    lr = Learner(tiny_model(items), cfg, SEEN, publish=lambda m, r: "v")
    for n in range(12):  # 24 item events after a first: enough for a held-out window
        for item in ("i1", "brand-new", "i2"):
            lr.observe(f"u{n}", RawEvent(item, ts=1.0 + n), 1.0)
    lr.observe("u9", RawEvent("rare", ts=9.0), 1.0)
    report = lr.update(10.0)
    assert report["published"] and "brand-new" in lr.serving.items.index and "rare" not in lr.serving.items.index
    assert lr.serving.items.index["brand-new"] <= lr.serving.items.n_trained


def test_an_update_adds_the_windows_transitions_to_the_hybrid_table_once():
    from model.transition import Transition
    items = [f"i{n}" for n in range(40)]
    model = tiny_model(items)
    model.cfg = replace(model.cfg, trans_weight=1.0)
    model.transition = Transition.fit([[1, 2]], len(items) + 1, neighbors=100, window=model.cfg.trans_window)
    cfg = LearnConfig(every_events=10**6, min_events=1, update_s=1.0, margin=-1.0, holdout_share=0.1)
    lr = Learner(model, cfg, SEEN, publish=lambda m, r: "v")
    for n in range(30):
        lr.observe(f"u{n}", RawEvent("i5", ts=1.0), 1.0, test=False)   # before the window: counted already
        lr.observe(f"u{n}", RawEvent("i6", ts=2.0), 2.0)
        lr.observe(f"u{n}", RawEvent("i7", ts=3.0), 3.0)
    report = lr.update(10.0)
    assert report["published"]
    got = lr.serving.transition
    rows, cols, w = got.pairs()
    counts = {(int(r), int(c)): float(x) for r, c, x in zip(rows, cols, w)}
    index = lr.serving.items.index
    # the newest 10% of the 60 window events (the last 3 users' two events) are held out of
    # training and of the counts; the i5 events came before the window and were counted before
    trained = 30 - 3
    assert counts[(index["i5"], index["i6"])] == trained and counts[(index["i6"], index["i7"])] == trained
    assert counts[(index["i5"], index["i7"])] == trained / 2
    assert counts[(1, 2)] == 1.0  # the old counts stay


def test_forget_erases_the_user_everywhere():
    lr = Learner(tiny_model([f"i{n}" for n in range(40)]), LearnConfig(memory_mb=0.01, history=5), SEEN)
    for u, e in stream(events=800):
        lr.observe(u, e, e.ts)
    victim = next(iter(lr.users))
    lr.replay.append((victim, (RawEvent("i1"),)))
    lr.forget(victim)
    assert victim not in lr.users and all(u != victim for u, _ in lr.replay)
    assert all(u != victim for u, _ in lr.window)


def with_dismisses(events: list[tuple[str, RawEvent]], every: int = 4) -> list[tuple[str, RawEvent]]:
    """`events` with a dismiss of a never-taken item ("no<n>") after every `every`-th one."""
    out = []
    for n, (u, e) in enumerate(events):
        out.append((u, e))
        if n % every == 0:
            out.append((u, RawEvent(f"no{n}", "dismiss", e.ts)))
    return out


def test_a_dismiss_is_context_never_a_test_or_a_target():
    items = [f"i{n}" for n in range(40)]
    lr = Learner(tiny_model(items), LearnConfig(every_events=400, min_events=100, min_item_events=1), SEEN)
    lr.observe("u", RawEvent("i1", "click", 1.0), 1.0)
    lr.observe("u", RawEvent("i2", "dismiss", 2.0), 2.0)
    assert not lr.pending and not lr.counts  # not scored; no evidence for a new item either
    lr.observe("u", RawEvent("i3", "click", 3.0), 3.0)
    assert [(p[0][-1].type, p[1]) for p in lr.pending] == [("dismiss", "i3")]  # but it is context
    # a dismissed item is a miss for the gate, as the worker would not show it
    greater, _ = rank_targets(lr.serving, [list(lr.pending[0][0])], ["i2"], SEEN)
    assert greater[0] == len(lr.serving.items)
    for u, e in with_dismisses(stream(events=1200)):
        lr.observe(u, e, e.ts)
    (_, targets), seqs, _ = lr._split_window()
    assert targets and not any(t.startswith("no") for t in targets)
    assert any(e.type == "dismiss" for s in seqs for e in s)  # trained on as inputs
    assert not any(i.startswith("no") for i in lr.counts)


def test_the_streaming_baselines_never_learn_from_a_dismiss():
    from model.prequential import OnlineBaselines

    runs = {}
    for name, events in (("clicks", stream(events=1500)), ("with dismisses", with_dismisses(stream(events=1500)))):
        base = runs[name] = OnlineBaselines(LearnConfig(), SEEN)
        for u, e in events:
            base.observe(u, e, test=True)
    co = runs["with dismisses"].co
    assert not any(i.startswith("no") for i in co.popularity)
    assert not any(i.startswith("no") for row in co.pairs.values() for i in row) and co.pairs == runs["clicks"].co.pairs
    # a dismiss is no test event: the same events are scored
    assert runs["with dismisses"].metrics["popularity"].count == runs["clicks"].metrics["popularity"].count


def test_prequential_replay_json_and_file_reader(tmp_path):
    rows = drifting_stream(50, 30, 1500, seed=2)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"event_id": f"e{n}", "user_id": u, "item_id": i, "type": "click", "ts": ts})
                            + "\n" for n, (u, i, ts) in enumerate(reversed(rows))) + "not json\n")
    events = read_events(str(path))
    assert [e.ts for _, e in events] == sorted(e.ts for _, e in events) and len(events) == 1500
    until = rows[900][2]
    model = tiny_model([f"i{n}" for n in range(30)])
    cfg = LearnConfig(every_events=200, min_events=100, update_s=2.0)
    frozen = replay(events, model, cfg, until, False, SEEN)
    cont = replay(events, tiny_model([f"i{n}" for n in range(30)]), cfg, until, True, SEEN)
    for res in (frozen, cont):
        assert {"protocol", "k", "hr", "ndcg", "mrr", "events", "updates"} <= set(res)
        assert res["protocol"] == "prequential" and 0 <= res["hr"] <= 1 and res["events"] > 500
    assert frozen["updates"] == 0 and cont["updates"] >= 2
    # the streaming baselines, scored on the same events (test, then learn)
    for name in ("cooccurrence", "popularity"):
        assert frozen[name]["events"] == frozen["events"] and 0 <= frozen[name]["hr"] <= 1
    assert frozen["cooccurrence"] == cont["cooccurrence"]
    assert frozen["cooccurrence"]["hr"] > frozen["popularity"]["hr"]  # the stream has successor structure
    # the frozen model tracked inside the continual run scores exactly as the frozen run
    assert cont["frozen"]["hr"] == pytest.approx(frozen["hr"]) and cont["frozen"]["events"] == frozen["events"]
    assert np.isfinite(cont["update_seconds_p50"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_learner_on_cuda_grows_fine_tunes_and_publishes_a_cpu_loadable_checkpoint(tmp_path):
    from model import checkpoint
    items = [f"i{n}" for n in range(40)]
    out = []
    cfg = LearnConfig(every_events=400, min_events=100, update_s=10.0, min_item_events=3, margin=-1.0)
    lr = Learner(tiny_model(items).to("cuda"), cfg, SEEN,
                 publish=lambda m, r: out.append(checkpoint.publish(str(tmp_path), m, {}, {"parent": None})) or out[-1])
    for u, e in stream(events=1200, new_items=0.2):
        lr.observe(u, e, e.ts)
        if lr.due(e.ts):
            lr.update(e.ts)
    assert out and lr.serving.device.type == "cuda" and lr.serving.cfg.n_items > 40
    loaded, _ = checkpoint.load(str(tmp_path / out[-1]))
    hist = [[RawEvent("i1"), RawEvent("i2"), RawEvent("i3")]]
    assert torch.allclose(loaded.user_vectors(hist), lr.serving.user_vectors(hist).cpu(), atol=1e-4)


def test_invented_item_ids_with_future_timestamps_keep_bookkeeping_bounded(monkeypatch):
    """Junk ids sent twice each with timestamps decades ahead: first_seen and the counts stay
    under their cap, and a future timestamp counts as at most MAX_CLOCK_SKEW_S ahead."""
    import model.continual as continual
    monkeypatch.setattr(continual, "MAX_COUNTED_ITEMS", 200)
    monkeypatch.setattr(continual, "MAX_NEW_ITEMS_PER_UPDATE", 5)
    items = [f"i{n}" for n in range(40)]
    cfg = LearnConfig(every_events=10**9, min_events=1, update_s=1.0, min_item_events=2, margin=-1.0)
    lr = Learner(tiny_model(items), cfg, SEEN, publish=lambda m, r: "v")
    far = 3.0e9  # year 2065
    for n in range(2_000):
        for _ in range(3):
            lr.observe(f"u{n % 50}", RawEvent(f"junk{n}", ts=far), 1000.0)
        assert len(lr.first_seen) <= 200 and len(lr.counts) <= 200
    assert max(lr.first_seen.values()) <= 1000.0 + continual.MAX_CLOCK_SKEW_S
    before = lr.serving.cfg.n_items
    lr.update(2000.0)
    assert lr.serving.cfg.n_items - before <= 5  # growth per update is capped
