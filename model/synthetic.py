"""Seeded synthetic `pairs` data shaped like Amazon review benchmarks.

Used to size training defaults (wall time per epoch at the Video Games shape: ~31k users,
~24k items, ~287k interactions) and for fast tests. Structure: Zipf item popularity, and
per user-group successor graphs, so the next item depends on the current item *and* on
who the user is: co-occurrence sees a mixture, a sequence model can infer the group.
"""
from __future__ import annotations

import numpy as np


def make_pairs(users: int, items: int, avg_len: float = 9.3, seed: int = 0, groups: int = 8,
               p_follow: float = 0.6, zipf: float = 0.75, min_len: int = 5,
               succ_p: tuple[float, ...] = (0.6, 0.25, 0.15)) -> list[tuple[str, str]]:
    """(user, item) pairs, each user's in time order; lengths >= min_len (5-core style)."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, items + 1) ** zipf
    pop = pop[rng.permutation(items)]
    pop /= pop.sum()
    succ = rng.choice(items, size=(groups, items, len(succ_p)), p=pop)
    group = rng.integers(0, groups, users)
    extra = max(avg_len - min_len, 0.1)
    lengths = min_len + rng.geometric(1.0 / (1.0 + extra), users) - 1
    cur = rng.choice(items, size=users, p=pop)
    seqs = np.zeros((users, int(lengths.max())), dtype=np.int64)
    seqs[:, 0] = cur
    for t in range(1, seqs.shape[1]):
        follow = rng.random(users) < p_follow
        which = rng.choice(len(succ_p), size=users, p=succ_p)
        jump = rng.choice(items, size=users, p=pop)
        cur = np.where(follow, succ[group, cur, which], jump)
        seqs[:, t] = cur
    return [(f"u{u}", f"i{seqs[u, t]}") for u in range(users) for t in range(lengths[u])]


def write_pairs(path: str, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w") as f:
        f.writelines(f"{u} {i}\n" for u, i in pairs)


if __name__ == "__main__":  # python -m model.synthetic OUT [users items avg_len seed]
    import sys
    a = sys.argv[1:]
    write_pairs(a[0], make_pairs(int(a[1]) if len(a) > 1 else 31000, int(a[2]) if len(a) > 2 else 24000,
                                 float(a[3]) if len(a) > 3 else 9.25, int(a[4]) if len(a) > 4 else 0))
