"""The item-transition term of the hybrid score: what usually comes next after the user's last items.

Why a count table beside the transformer: on sparse catalogues most of the next-item
signal is short-range and directed (a refill after its first purchase), and a 64-dim dot
product cannot memorise sparse item pairs the way a count table does, while the
transformer carries what counts cannot (longer context, content, searches, time). The
served score of item i for a user is (docs/model.md, "Hybrid score")

    score(u, i) = u · M_i + weight · log(1 + t_u(i) / eps),   t_u(i) = Σ_d P(i | item_-d) / d

over the user's last `window` items (d = 1 is the newest), where P(i | j) is the share of
j's directed, distance-weighted transitions that went to i. That is the log-linear blend
`log_softmax(u · M) + weight · log(eps + t_u)` less a per-user constant, so rankings are
the same. `weight` and `eps` are chosen on validation when training (model/train.py), so
the mix comes from the data, never a constant.

Storage is CSR over the trained vocabulary: the top `neighbors` successors of each item
with their counts, and each row's total over all its transitions (pruned ones included),
so a refresh (`merged`) adds new counts without the original data. The tensors are
buffers of `SeqRec.transition`, saved in the checkpoint's safetensors file, so live equals
offline and a restart changes nothing. Memory is at most 8 bytes x neighbors x items.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

BUFFERS = ("indptr", "cols", "counts", "totals")


class Transition(nn.Module):
    """Top-N directed successor counts per item row (row 0 = OOV, always empty)."""

    def __init__(self, n_rows: int = 1) -> None:
        super().__init__()
        self.register_buffer("indptr", torch.zeros(n_rows + 1, dtype=torch.long))
        self.register_buffer("cols", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("totals", torch.zeros(n_rows))

    @property
    def n_rows(self) -> int:
        return len(self.totals)

    @property
    def entries(self) -> int:
        return len(self.cols)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Buffers take the saved shapes (the table's size is data, not config); a checkpoint
        without a table loads as an empty one."""
        absent = [prefix + n for n in BUFFERS if prefix + n not in state_dict]
        for name in BUFFERS:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.indptr.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in absent:
            if key in missing_keys:
                missing_keys.remove(key)

    # ---- building ------------------------------------------------------------------
    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], n_rows: int, neighbors: int, window: int,
            starts: Sequence[int] | None = None) -> "Transition":
        """Count every sequence's transitions (item indices, oldest first; 0 = unknown, skipped)."""
        rows, cols, w = pair_counts(sequences, window, starts)
        return cls.from_pairs(rows, cols, w, n_rows, neighbors)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, w: np.ndarray, n_rows: int, neighbors: int,
                   totals: np.ndarray | None = None) -> "Transition":
        """Aggregate (row, col, weight) triples, keep each row's `neighbors` largest.
        `totals` (default: the triples' own row sums) normalise rows at scoring time."""
        t = cls(n_rows)
        keep = (rows > 0) & (rows < n_rows) & (cols > 0) & (cols < n_rows)
        rows, cols, w = rows[keep], cols[keep], w[keep]
        tot = np.bincount(rows, weights=w, minlength=n_rows) if totals is None else totals
        if len(rows):
            uniq, inv = np.unique(rows.astype(np.int64) * n_rows + cols, return_inverse=True)
            cnt = np.bincount(inv, weights=w)
            r, c = uniq // n_rows, uniq % n_rows
            order = np.lexsort((-cnt, r))               # by row, strongest first
            r, c, cnt = r[order], c[order], cnt[order]
            first = np.searchsorted(r, r)                 # start of each entry's row
            top = (np.arange(len(r)) - first) < neighbors
            r, c, cnt = r[top], c[top], cnt[top]
            t.indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n_rows))]))
            t.cols = torch.from_numpy(c.astype(np.int32))
            t.counts = torch.from_numpy(cnt.astype(np.float32))
        t.totals = torch.from_numpy(np.asarray(tot, np.float32))
        return t

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored (row, col, count) triples."""
        ptr = self.indptr.cpu().numpy()
        rows = np.repeat(np.arange(self.n_rows), np.diff(ptr))
        return rows, self.cols.cpu().numpy().astype(np.int64), self.counts.cpu().numpy().astype(np.float64)

    def merged(self, sequences: Iterable[Sequence[int]], n_rows: int, neighbors: int, window: int,
               starts: Sequence[int] | None = None) -> "Transition":
        """A refreshed copy: the stored counts plus the given sequences' transitions (only those
        ending at or after `starts[i]`, so events counted before are not counted twice)."""
        r0, c0, w0 = self.pairs()
        r1, c1, w1 = pair_counts(sequences, window, starts)
        totals = np.zeros(n_rows)
        totals[: self.n_rows] = self.totals.cpu().numpy()[:n_rows]
        totals += np.bincount(r1[r1 < n_rows], weights=w1[r1 < n_rows], minlength=n_rows)
        return Transition.from_pairs(np.concatenate([r0, r1]), np.concatenate([c0, c1]), np.concatenate([w0, w1]),
                                     n_rows, neighbors, totals).to(self.indptr.device)

    def padded(self, n_rows: int) -> "Transition":
        """The same table over a grown vocabulary (new rows empty)."""
        if n_rows <= self.n_rows:
            return self
        t = Transition(n_rows).to(self.indptr.device)
        t.indptr[: self.n_rows + 1] = self.indptr
        t.indptr[self.n_rows + 1:] = self.indptr[-1]
        t.cols, t.counts = self.cols.clone(), self.counts.clone()
        t.totals[: self.n_rows] = self.totals
        return t

    # ---- scoring -------------------------------------------------------------------
    def add_to(self, scores: torch.Tensor, recent: Sequence[Sequence[int]], window: int, weight: float,
               eps: float) -> torch.Tensor:
        """scores[b, i] += weight · log(1 + t_b(i) / eps) in place, touching only neighbour entries."""
        n_cols = scores.shape[1]
        key, bonus = self.bonus(recent, window, weight, eps, n_cols)
        if len(key):
            scores.index_put_(((key // n_cols).to(scores.device), (key % n_cols).to(scores.device)),
                              bonus.to(scores.dtype).to(scores.device), accumulate=True)
        return scores

    def bonus(self, recent: Sequence[Sequence[int]], window: int, weight: float, eps: float,
              n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-zero terms as sorted keys b · n_cols + i and their values; two-stage
        retrieval adds the columns to its candidates, so the hybrid is exact there too."""
        empty = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        n_rows = self.n_rows  # hot path (every served batch): plain Python over <= window items a user
        picked = [(row, 1.0 / dist, item) for row, seq in enumerate(recent)
                  for dist, item in enumerate(reversed(seq[-window:]), start=1) if 0 < item < n_rows]
        if not picked or not self.entries:
            return empty
        dev = self.indptr.device
        picked_t = torch.from_numpy(np.asarray(picked, dtype=np.float64)).to(dev)   # one copy: [P, 3]
        rows_p, it = picked_t[:, 0].long(), picked_t[:, 2].long()
        share_p = (picked_t[:, 1] / self.totals[it].double().clamp(min=1e-12)).float()
        start = self.indptr[it]
        lens = self.indptr[it + 1] - start
        total = int(lens.sum())
        if not total:
            return empty
        owner = torch.repeat_interleave(torch.arange(len(it), device=dev), lens)
        pos = start[owner] + torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        t, rows, cols = self.counts[pos] * share_p[owner], rows_p[owner], self.cols[pos].long()
        if n_rows > n_cols:  # a score matrix narrower than the table: drop what it has no column for
            ok = cols < n_cols
            t, rows, cols = t[ok], rows[ok], cols[ok]
        key, inv = torch.unique(rows * n_cols + cols, return_inverse=True)
        summed = torch.zeros(len(key), device=dev).index_add_(0, inv, t)
        return key, weight * torch.log1p(summed / eps)

    def share_of(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """P(col | row) for each pair (0 where the table has no such entry): the reasons of
        model/reasons.py ask it for a few pairs per recommended item, so it is a binary search
        over the entries' keys, sorted once per table."""
        keys, shares = self._sorted_keys()
        out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        if not len(keys):
            return out
        ok = (rows > 0) & (rows < self.n_rows) & (cols > 0) & (cols < self.n_rows)
        q = rows.long().clamp(0, self.n_rows - 1) * self.n_rows + cols.long().clamp(0, self.n_rows - 1)
        pos = torch.searchsorted(keys, q.to(keys.device)).clamp(max=len(keys) - 1)
        hit = (keys[pos] == q.to(keys.device)) & ok.to(keys.device)
        return torch.where(hit, shares[pos], torch.zeros((), device=keys.device)).to(out.device)

    def _sorted_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        tag = (self.cols.data_ptr(), len(self.cols), self.indptr.data_ptr(), self.n_rows)
        cached = self.__dict__.get("_keys")
        if cached is None or cached[0] != tag:
            rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.indptr.device),
                                           self.indptr[1:] - self.indptr[:-1])
            keys = rows * self.n_rows + self.cols.long()
            order = torch.argsort(keys)
            shares = self.counts / self.totals[rows].clamp(min=1e-12)
            cached = (tag, keys[order], shares[order].float())
            self.__dict__["_keys"] = cached
        return cached[1], cached[2]

    def scores(self, recent: Sequence[Sequence[int]], n_cols: int, window: int) -> torch.Tensor:
        """t_u alone, dense [B, n_cols] (for evaluating the term by itself)."""
        out = torch.zeros(len(recent), n_cols, device=self.indptr.device)
        return self.add_to(out, recent, window, 1.0, 1.0)


def pair_counts(sequences: Iterable[Sequence[int]], window: int,
                starts: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prev, next, 1/distance) for every pair within `window` in each sequence, vectorised;
    with `starts`, only pairs whose `next` is at position >= starts[i] of sequence i."""
    flat, owner, position, limit = [], [], [], []
    for s, seq in enumerate(sequences):
        flat.extend(seq)
        owner.extend([s] * len(seq))
        position.extend(range(len(seq)))
        limit.extend([starts[s] if starts is not None else 0] * len(seq))
    items, own, pos, lim = (np.asarray(a, np.int64) for a in (flat, owner, position, limit))
    rows, cols, w = [], [], []
    for d in range(1, window + 1):
        if len(items) <= d:
            break
        prev, nxt = items[:-d], items[d:]
        ok = (own[:-d] == own[d:]) & (prev != nxt) & (prev > 0) & (nxt > 0) & (pos[d:] >= lim[d:])
        rows.append(prev[ok]); cols.append(nxt[ok]); w.append(np.full(int(ok.sum()), 1.0 / d))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(w)
