"""Candidate retrieval for large catalogs: an HNSW graph over the item matrix.

Why two stages: exact top-K scores every user against every item, so a refresh costs
N·D multiply-adds and a million-item catalog makes it the whole worker's budget. The
graph (faiss `IndexHNSWFlat`, inner product) returns C candidates in roughly log N hops;
`ItemScorer` then scores only those exactly, with the hybrid's transition term and the
seen/availability filters, so the order among candidates is the one-stage order and only
recall can differ (docs/design.md, "Two-stage retrieval is exact on its candidates").

Why HNSW with inner product and no quantisation: measured on random and trained matrices
it reaches recall@10 >= 0.98 after exact re-scoring at C = 100 (docs/benchmarks.md,
"Retrieval"), where IVF over inner products without a metric transform stays below 0.4,
and the L2 transform of MIPS breaks HNSW's greedy search. The graph stores a copy of the
vectors; that memory is reported by `nbytes`.

The index follows the matrix without a rebuild: rows the item index adds or changes are
added again under the same id (`add`), and search results are de-duplicated, so a stale
copy can only widen the candidate set, never change a score. A new checkpoint builds a
new index in the loader thread; the old model serves until it is ready.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

MODES = ("exact", "ann", "auto")


class ANNIndex:
    """Ids are ItemIndex rows (row 0, the OOV row, is never indexed)."""

    def __init__(self, dim: int, degree: int = 32, ef_construction: int = 100, ef_search: int = 128,
                 threads: int = 1, build_threads: int | None = None) -> None:
        """`threads` for searches (the worker's inference budget); `build_threads` (default: every
        core) for adding rows, which runs in the loader thread, off the event loop."""
        import faiss  # only where a large catalog is served

        self._faiss = faiss
        self.threads = threads
        self.build_threads = build_threads or os.cpu_count() or 1
        self.ef_search = ef_search
        graph = faiss.IndexHNSWFlat(dim, degree, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        self.index = faiss.IndexIDMap(graph)
        self.graph = graph
        self.rows = 0  # highest row indexed + 1
        self.copies = 0  # stale copies left by updates (rows added again)

    @classmethod
    def build(cls, matrix: torch.Tensor, **kw) -> "ANNIndex":
        index = cls(matrix.shape[1], **kw)
        index.add(np.arange(1, len(matrix)), matrix[1:])
        return index

    def add(self, rows: np.ndarray, vectors: torch.Tensor) -> None:
        """Index `rows` (new or changed) with their current vectors."""
        rows = np.asarray(rows, dtype=np.int64)
        keep = rows > 0
        rows, vec = rows[keep], vectors.detach().float().cpu().numpy()[keep]
        if not len(rows):
            return
        self.copies += int((rows < self.rows).sum())
        self.rows = max(self.rows, int(rows.max()) + 1)
        with self._threads(self.build_threads if len(rows) > 10_000 else self.threads):
            self.index.add_with_ids(np.ascontiguousarray(vec), rows)

    def search(self, queries: torch.Tensor, c: int, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """[B, c] candidate rows (0 = none), never a `blocked` row: those are filtered inside
        the graph search, so they do not use up candidates."""
        faiss = self._faiss
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, c)
        if blocked is not None and len(blocked):
            ids = np.ascontiguousarray(blocked.cpu().numpy().astype(np.int64))
            keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
            params.sel = keep
        with self._threads(self.threads):
            _, found = self.index.search(q, c, params=params)
        found[found < 0] = 0
        return torch.from_numpy(found)

    def nbytes(self) -> int:
        """Vectors copied into the graph plus its links (faiss stores 4-byte neighbour ids)."""
        g = self.graph
        return g.ntotal * (g.d * 4 + int(g.hnsw.neighbors.size()) * 4 // max(g.ntotal, 1) + 8)

    @contextmanager
    def _threads(self, n: int) -> Iterator[None]:
        """faiss' OpenMP pool is process-wide: the worker's thread budget, then back."""
        before = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(n)
        try:
            yield
        finally:
            self._faiss.omp_set_num_threads(before)


def use_ann(mode: str, n_items: int, min_items: int) -> bool:
    """`auto` picks the graph from `min_items` up: the measured catalog size where exact
    scoring starts to cost more than search plus re-scoring (docs/benchmarks.md, "Retrieval")."""
    if mode not in MODES:
        raise ValueError(f"retrieval must be one of {MODES}, not {mode!r}")
    return mode == "ann" or (mode == "auto" and n_items >= min_items)
