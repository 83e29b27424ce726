"""The hybrid's transition term: counts, pruning, scoring, refresh, growth and checkpoints,
each against a plain-Python reference."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import torch

from model import checkpoint
from model.config import ModelConfig
from model.features import ItemIndex
from model.transformer import SeqRec
from model.transition import Transition, pair_counts
from model.vocab import grow

N_ROWS = 31  # items 1..30


def sequences(seed: int = 0, n: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice([0] + list(range(1, N_ROWS))) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def reference_counts(seqs, window, starts=None) -> dict[tuple[int, int], float]:
    """CoOccurrence's rule: prev -> item within `window`, weight 1/distance, no self pairs."""
    out: dict[tuple[int, int], float] = defaultdict(float)
    for s, seq in enumerate(seqs):
        for p, item in enumerate(seq):
            if starts is not None and p < starts[s]:
                continue
            for d in range(1, window + 1):
                if p - d >= 0 and seq[p - d] != item and seq[p - d] > 0 and item > 0:
                    out[(seq[p - d], item)] += 1.0 / d
    return out


def table(t: Transition) -> dict[tuple[int, int], float]:
    r, c, w = t.pairs()
    return {(int(a), int(b)): float(x) for a, b, x in zip(r, c, w)}


def test_counts_match_the_reference_and_prune_to_the_strongest() -> None:
    seqs = sequences()
    ref = reference_counts(seqs, 3)
    full = Transition.fit(seqs, N_ROWS, neighbors=1000, window=3)
    assert table(full) == pytest.approx(ref)
    pruned = Transition.fit(seqs, N_ROWS, neighbors=2, window=3)
    for row in range(N_ROWS):
        kept = sorted(v for (r, _), v in table(pruned).items() if r == row)
        want = sorted((v for (r, _), v in ref.items() if r == row), reverse=True)[:2]
        assert kept == pytest.approx(sorted(want))
        # row totals count every transition, pruned ones too: shares stay true probabilities
        assert pruned.totals[row].item() == pytest.approx(sum(v for (r, _), v in ref.items() if r == row), rel=1e-6)


def test_bonus_equals_the_formula() -> None:
    seqs = sequences(1)
    t = Transition.fit(seqs, N_ROWS, neighbors=5, window=4)
    ref, tot = table(t), t.totals.numpy()
    recent = [[3, 7, 0, 12], [], [5], [29, 29, 1]]
    w, eps, window = 1.7, 0.05, 3
    got = t.add_to(torch.zeros(len(recent), N_ROWS), recent, window, w, eps)
    want = np.zeros((len(recent), N_ROWS))
    for b, seq in enumerate(recent):
        tu = defaultdict(float)
        for d, item in enumerate(reversed(seq[-window:]), start=1):
            for (r, c), v in ref.items():
                if r == item:
                    tu[c] += v / tot[r] / d
        for c, v in tu.items():
            want[b, c] = w * math.log1p(v / eps)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert torch.equal(t.scores(recent, N_ROWS, window) > 0, got > 0)


def test_refresh_counts_new_events_once() -> None:
    seqs = sequences(2)
    cut = [len(s) // 2 for s in seqs]
    old = Transition.fit([s[:c] for s, c in zip(seqs, cut)], N_ROWS, neighbors=1000, window=3)
    merged = old.merged(seqs, N_ROWS, neighbors=1000, window=3, starts=cut)
    whole = Transition.fit(seqs, N_ROWS, neighbors=1000, window=3)
    assert table(merged) == pytest.approx(table(whole))
    assert torch.allclose(merged.totals, whole.totals)


def test_growth_pads_rows_and_keeps_counts() -> None:
    t = Transition.fit(sequences(3), N_ROWS, neighbors=4, window=2)
    g = t.padded(N_ROWS + 5)
    assert g.n_rows == N_ROWS + 5 and table(g) == table(t)
    grown = g.merged([[N_ROWS + 2, 4]], N_ROWS + 5, neighbors=4, window=2)
    assert table(grown)[(N_ROWS + 2, 4)] == 1.0


def test_pairs_skip_unknowns_and_respect_sequence_bounds() -> None:
    rows, cols, w = pair_counts([[1, 2], [3], [4, 0, 5]], window=2)
    got = sorted(zip(rows.tolist(), cols.tolist(), w.tolist()))
    assert got == [(1, 2, 1.0), (4, 5, 0.5)]


def tiny_model(n_items: int = 30, weight: float = 2.0) -> SeqRec:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=n_items, dim=16, n_layers=1, n_heads=2, window=4, trans_weight=weight, trans_eps=0.1)
    model = SeqRec(cfg, ItemIndex([f"i{i}" for i in range(1, n_items + 1)], cfg)).eval()
    model.transition = Transition.fit(sequences(4), n_items + 1, neighbors=6, window=cfg.trans_window)
    return model


def test_weight_zero_is_the_transformer_alone_and_the_term_moves_neighbours_up() -> None:
    model = tiny_model()
    u = torch.randn(3, 16)
    recent = model.recent_items([["i3", "i7"], [], ["nope", "i5"]])
    plain = u @ model.item_matrix().T
    hybrid = model.scores(u, recent)
    assert torch.equal(model.scores(u, None), plain)
    assert torch.equal(hybrid[1], plain[1])  # no history, no term
    assert bool((hybrid >= plain - 1e-6).all()) and bool((hybrid > plain + 1e-3).any())
    model.cfg = replace(model.cfg, trans_weight=0.0)
    assert torch.equal(model.scores(u, recent), plain)


def test_checkpoint_round_trip_keeps_the_table_and_integers(tmp_path) -> None:
    model = tiny_model()
    checkpoint.save(str(tmp_path / "c"), model)
    loaded, meta = checkpoint.load(str(tmp_path / "c"))
    assert meta["config"]["trans_weight"] == 2.0
    assert loaded.transition.cols.dtype == torch.int32 and table(loaded.transition) == table(model.transition)
    u = torch.randn(2, 16)
    recent = model.recent_items([["i1", "i2", "i3"], ["i9"]])
    assert torch.allclose(loaded.scores(u, recent), model.scores(u, recent), atol=1e-6)


def test_a_checkpoint_without_a_table_loads_as_the_transformer_alone(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    model = tiny_model()
    checkpoint.save(str(tmp_path / "c"), model)
    path = tmp_path / "c" / checkpoint.WEIGHTS
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("transition.")}, str(path))
    loaded, _ = checkpoint.load(str(tmp_path / "c"))
    u = torch.randn(2, 16)
    recent = loaded.recent_items([["i1", "i2"], ["i9"]])
    assert loaded.transition.entries == 0
    assert torch.allclose(loaded.scores(u, recent), u @ loaded.item_matrix().T)


def test_a_grown_vocabulary_keeps_the_hybrid_on_old_items() -> None:
    model = tiny_model()
    grown = grow(model, ["fresh-1", "fresh-2"]).eval()
    u = torch.randn(2, 16)
    recent = model.recent_items([["i3", "i4"], ["i8"]])
    assert torch.allclose(grown.scores(u, recent)[:, :31], model.scores(u, recent), atol=1e-5)
