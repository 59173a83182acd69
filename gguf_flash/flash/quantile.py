"""np.quantile(A, q) (its default 'linear' method) of a large float array without copying it.

np.quantile partitions a copy of its input: on TinyLlama's per-layer scores (3072 tokens x 5632 neurons
f32, 66 MiB) the copy was as large as the scores, the calibration phase's peak. Here the order statistics
the quantiles need are found by bracketing instead (a selection by sampling, Floyd & Rivest 1975): a
random sample's order statistics give, for each needed rank, an interval that holds it with high
probability; one pass over A in row blocks counts the values below each interval and collects the few
inside it; the rank is then selected among those. An interval that misses its rank (a count shows it) is
widened and the pass repeated, so the answer is exact whatever the sample. A is only read.
"""

from __future__ import annotations

import numpy as np

from ..kernels.nn import search_slots

SAMPLE = 1 << 20        # values sampled to place the brackets (4 MiB of f32)
SIGMAS = 5.0            # bracket half-width in standard deviations of the sample rank
BLOCK = 1 << 19         # values per block of the counting pass (its temporaries: ~10 MiB)


def quantiles(A: np.ndarray, q, seed: int = 0) -> np.ndarray:
    """(len(q),) float64: np.quantile(A, q) over all of A (any shape, finite values), A left unchanged."""
    a = A.reshape(-1)                                                # (N,) a view when A is contiguous
    q = np.asarray(q, np.float64)
    n = a.size
    pos = q * (n - 1)                                                # np.quantile's virtual index
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    ranks = np.unique(np.concatenate([below, above]))
    values = dict(zip(ranks.tolist(), order_statistics(a, ranks, seed)))
    lo = np.array([values[k] for k in below.tolist()], a.dtype)
    hi = np.array([values[k] for k in above.tolist()], a.dtype)
    return _lerp(lo, hi, pos - below)


def temp_bytes(n: int, n_q: int, itemsize: int = 4) -> int:
    """The most quantiles() holds besides A, for n values and n_q quantiles: the sample (its indices,
    values, sorted values), a block's temporaries (float64 cast, slots, mask) and the values collected
    inside the brackets (each about SIGMAS / sqrt(SAMPLE) of A)."""
    m = min(n, SAMPLE)
    inside = min(n, int(n * n_q * SIGMAS / np.sqrt(m)))
    return m * (8 + 2 * itemsize) + min(n, BLOCK) * (8 + 8 + 1 + itemsize) + 2 * inside * itemsize


def _lerp(a, b, t):
    """numpy's _lerp (function_base.py): a + (b - a) t, from b's side when t >= 0.5; b - a in the
    values' own dtype, as numpy takes it."""
    d = (b - a).astype(np.float64)
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t).astype(np.float64)


def order_statistics(a: np.ndarray, ranks: np.ndarray, seed: int = 0) -> np.ndarray:
    """(len(ranks),) a's values at these 0-based ranks of its sorted order (np.sort(a)[ranks]); a (N,)."""
    n = a.size
    ranks = np.asarray(ranks, np.int64)
    if n == 0 or ranks.min() < 0 or ranks.max() >= n:
        raise ValueError(f"ranks must be within [0, {n}) of a non-empty array")
    m = min(n, SAMPLE)
    rng = np.random.default_rng(seed)
    sample = np.sort(a[rng.integers(0, n, m)] if m < n else a)       # (m,)
    width = SIGMAS * np.sqrt(m * 0.25) + 2                            # sample ranks either side
    out = np.empty(len(ranks), a.dtype)
    todo = np.arange(len(ranks))
    while len(todo):
        centre = ranks[todo] / max(n - 1, 1) * (m - 1)
        lo = _edge(sample, np.floor(centre - width).astype(np.int64), -np.inf)
        hi = _edge(sample, np.ceil(centre + width).astype(np.int64), np.inf)
        found = _select(a, ranks[todo], lo, hi)
        for i, v in zip(todo.tolist(), found):
            if v is not None:
                out[i] = v
        todo = np.array([i for i, v in zip(todo.tolist(), found) if v is None], np.int64)
        width *= 4
    return out


def _edge(sample, idx, beyond):
    """sample[idx] (float64), with `beyond` (+-inf) where idx falls off the sample: a bracket that
    reaches the sample's end reaches A's end too."""
    out = np.full(len(idx), beyond, np.float64)
    ok = (idx >= 0) & (idx < len(sample))
    out[ok] = sample[idx[ok]]
    return out


def _select(a, ranks, lo, hi) -> list:
    """Per rank k: a's k-th smallest value if it lies in its bracket (lo, hi], else None (widen).
    One pass over a: brackets are merged into disjoint intervals, each value's interval found by
    np.searchsorted on their edges (edges[2i], edges[2i+1]] = interval i."""
    starts, ends = _merge(lo, hi)
    edges = np.empty(2 * len(starts), np.float64)                    # (2 * n_intervals,)
    edges[0::2], edges[1::2] = starts, ends
    count = np.zeros(len(edges) + 1, np.int64)                        # values per slot between edges
    inside = [[] for _ in starts]
    slots = np.empty(min(a.size, BLOCK), np.int64)                    # (BLOCK,) int64
    for s in range(0, a.size, BLOCK):
        block = a[s:s + BLOCK]
        slot = slots[:len(block)]
        search_slots(slot, edges, block)                             # number of edges < value
        count += np.bincount(slot, minlength=len(count))
        odd = (slot & 1).astype(bool)                                # inside interval slot // 2
        vals, which = block[odd], slot[odd] // 2
        order = np.argsort(which, kind="stable")
        cuts = np.searchsorted(which[order], np.arange(len(starts) + 1))
        for i in range(len(starts)):
            if cuts[i + 1] > cuts[i]:
                inside[i].append(vals[order[cuts[i]:cuts[i + 1]]])
    n_below = np.cumsum(count)                                        # n_below[2i]: values <= starts[i]
    found = []
    for k, l in zip(ranks.tolist(), lo.tolist()):
        i = int(np.searchsorted(starts, l, side="right")) - 1        # the interval holding bracket (l, h]
        first, n_in = int(n_below[2 * i]), int(count[2 * i + 1])
        if not first <= k < first + n_in:
            found.append(None)
            continue
        vals = np.concatenate(inside[i])
        found.append(np.partition(vals, k - first)[k - first])
    return found


def _merge(lo, hi):
    """Disjoint sorted intervals (starts, ends) covering the brackets (lo_j, hi_j]."""
    order = np.argsort(lo, kind="stable")
    starts, ends = [], []
    for l, h in zip(lo[order].tolist(), hi[order].tolist()):
        if starts and l <= ends[-1]:
            ends[-1] = max(ends[-1], h)
        else:
            starts.append(l)
            ends.append(h)
    return np.array(starts, np.float64), np.array(ends, np.float64)
