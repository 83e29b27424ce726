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


def drifting_stream(users: int, items: int, events: int, drift_at: float = 0.5, new_items: float = 0.1,
                    shift: float = 0.5, seed: int = 0, groups: int = 8, p_follow: float = 0.6, zipf: float = 0.75,
                    start_ts: float = 1.75e9, step_s: float = 1.0) -> list[tuple[str, str, float]]:
    """(user, item, ts) in time order, one user's event per second: the bench of continual
    learning (`streamrec bench freshness`). At `drift_at` of the stream the world changes:
    `new_items` x `items` new items appear and take popular ranks, popularity reshuffles, a
    `shift` share of each group's successor lists is redrawn and of the users change group
    (interests move). `shift=0, new_items=0` is the stationary control."""
    rng = np.random.default_rng(seed)
    n_new = int(items * new_items)

    def popularity(n: int) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1) ** zipf
        return p / p.sum()

    pop1 = np.zeros(items + n_new)
    pop1[:items] = popularity(items)[rng.permutation(items)]
    pop2 = pop1.copy()
    if shift or n_new:
        ranks = rng.permutation(items + n_new)
        if n_new:  # new items land among the most popular fifth
            top = rng.choice((items + n_new) // 5, n_new, replace=False)
            rest = np.setdiff1d(np.arange(items + n_new), top)
            ranks = np.empty(items + n_new, np.int64)
            ranks[items:] = top
            ranks[:items] = rest[rng.permutation(items)]
        mixed = popularity(items + n_new)[ranks]
        pop2 = (1 - shift) * pop1 + shift * mixed if n_new == 0 else mixed
        pop2 /= pop2.sum()
    succ1 = rng.choice(items + n_new, size=(groups, items + n_new, 3), p=pop1)
    succ2 = succ1.copy()
    redraw = rng.random((groups, items + n_new)) < shift
    redraw[:, items:] = True
    succ2[redraw] = rng.choice(items + n_new, size=(int(redraw.sum()), 3), p=pop2)
    group = rng.integers(0, groups, users)
    group2 = np.where(rng.random(users) < shift, rng.integers(0, groups, users), group)
    cur = np.full(users, -1)
    who = rng.integers(0, users, events)
    follow = rng.random(events) < p_follow
    which = rng.choice(3, size=events, p=(0.6, 0.25, 0.15))
    jumps1, jumps2 = rng.choice(items + n_new, events, p=pop1), rng.choice(items + n_new, events, p=pop2)
    cut = int(events * drift_at)
    out = []
    for t in range(events):
        u = who[t]
        late = t >= cut
        if cur[u] >= 0 and follow[t]:
            nxt = (succ2 if late else succ1)[(group2 if late else group)[u], cur[u], which[t]]
        else:
            nxt = (jumps2 if late else jumps1)[t]
        cur[u] = nxt
        out.append((f"u{u}", f"i{nxt}", start_ts + t * step_s))
    return out


if __name__ == "__main__":  # python -m model.synthetic OUT [users items avg_len seed]
    import sys
    a = sys.argv[1:]
    write_pairs(a[0], make_pairs(int(a[1]) if len(a) > 1 else 31000, int(a[2]) if len(a) > 2 else 24000,
                                 float(a[3]) if len(a) > 3 else 9.25, int(a[4]) if len(a) > 4 else 0))
