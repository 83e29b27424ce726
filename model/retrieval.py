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
        self.refreshes = 0  # times the links were kept for a new model's vectors (`refreshed`)

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

    def refreshed(self, matrix: torch.Tensor, rows_of: np.ndarray) -> "ANNIndex":
        """A copy with this graph's links and `matrix`'s vectors: a new checkpoint of the same
        lineage (the learner's fine-tune, its vocabulary grown) moves vectors a little, so the
        old links still lead to the right neighbourhood, and the copy costs one pass over
        the vectors instead of a build. `rows_of[old_row]` is the new row (0: gone); rows the
        old graph lacks are added. Recall is kept by re-scoring; `refreshes` counts how far
        the links are from a build, so the caller can rebuild from time to time."""
        faiss = self._faiss
        new = ANNIndex.__new__(ANNIndex)
        new.__dict__.update(self.__dict__)
        new.index = faiss.clone_index(self.index)  # an IndexIDMap that owns its copy (a downcast proxy would not)
        new.graph = faiss.downcast_index(new.index.index)
        ids = faiss.vector_to_array(new.index.id_map)
        mapped = np.where(ids < len(rows_of), rows_of[np.minimum(ids, len(rows_of) - 1)], 0).astype(np.int64)
        faiss.copy_array_to_vector(mapped, new.index.id_map)
        vectors = np.ascontiguousarray(matrix.detach().float().cpu().numpy()[mapped])
        faiss.copy_array_to_vector(vectors.view(np.uint8).ravel(), faiss.downcast_index(new.graph.storage).codes)
        covered = np.zeros(len(matrix), bool)
        covered[mapped] = True
        covered[0] = True
        missing = np.flatnonzero(~covered)
        new.rows, new.refreshes = int(mapped.max(initial=0)) + 1, self.refreshes + 1
        new.add(missing, matrix[torch.from_numpy(missing)])
        return new

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
