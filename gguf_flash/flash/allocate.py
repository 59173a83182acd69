"""Per-layer sparsity allocation on held-out loss (issue 13, 3a; TEAL, Liu et al. 2024, section 4.2: a
greedy allocation across layers).

The same sparsity in every layer is not the cheapest way to a mean sparsity: some layers lose little
loss at high sparsity, others much at low. Here the cost of each layer is measured on the loss itself:

  1. layer_costs   mean NLL increase on the drive tokens when layer l alone is sparsified at each
                   measured level (every other layer dense). The states entering layer l are the dense
                   ones, so each measurement runs from layer l to the head (layerwise.LayerPass.layers)
                   while the dense states advance a layer at a time: L x levels partial passes, about
                   L x levels / 2 whole ones plus a head each.
  2. greedy_path   TEAL's greedy on the additive costs: from all layers dense, raise the layer whose next
                   level costs least per unit of sparsity; every step is an allocation with a higher
                   mean sparsity.
  3. verify        each allocation by a whole pass (every layer at its level) on the drive tokens, to
                   choose, and on other tokens (the judge), never used to choose.

The converter's `--allocate` (opt-in, slower) runs 1-3 with the last training chunk as the drive
(bisect_path on the drive's perplexity) and the held-out chunks as the judge. Measured (docs/design.md,
"Per-layer sparsity allocation"): on Gemma 3's gate criterion it wins (0.2 at +1.7% on the judge, where
one sparsity for all layers keeps 2% only at 0.1); on SmolLM2 it loses to one sparsity for all layers
at the same mean, and the allocation chosen on the drive chunk overfits it.
"""

from __future__ import annotations

import numpy as np


def layer_costs(lp, seqs, Q, scale, levels, tick=None) -> tuple[np.ndarray, float]:
    """(costs (n_layer, len(levels)) f64, dense mean NLL) on the one-step sequences `seqs`: costs[l, k]
    is the mean NLL increase when only layer l has threshold Q[l, levels[k]] (Q (n_layer, grid) f32;
    scale (n_layer, n_ff) for the product criterion or None: as LayerPass.run); tick() after each pass."""
    L = lp.model.cfg.n_layer
    zeros = np.zeros(L, np.float32)
    X, rope = lp.embed(seqs)
    Y = X.copy()                               # the pass's buffer; X keeps the dense states
    lp.layers(seqs, Y, rope, 0, L, zeros, scale)
    total, n = lp.states_nll(seqs, lp.final(Y))
    dense = total / max(n, 1)
    if tick:
        tick()
    costs = np.zeros((L, len(levels)))
    for il in range(L):
        for k, j in enumerate(levels):
            thr = zeros.copy()
            thr[il] = Q[il, j]
            np.copyto(Y, X)                    # the dense states entering layer il
            lp.layers(seqs, Y, rope, il, L, thr, scale)
            total, n = lp.states_nll(seqs, lp.final(Y))
            costs[il, k] = total / max(n, 1) - dense
            if tick:
                tick()
        lp.layers(seqs, X, rope, il, il + 1, zeros, scale)    # advance the dense states one layer
    return costs, dense


def greedy_path(costs, sparsity) -> list:
    """TEAL's greedy on additive per-layer costs (n_layer, levels) at `sparsity` (levels,) increasing:
    from every layer dense, each step raises one layer to its next level, the one whose step costs least
    per unit of sparsity. Returns the allocations in order, each (mean sparsity, (n_layer,) int level
    index, -1: dense), the first all dense."""
    L = len(costs)
    C = np.concatenate([np.zeros((L, 1)), np.asarray(costs, np.float64)], axis=1)   # (L, 1 + levels)
    s = np.concatenate([[0.0], np.asarray(sparsity, np.float64)])
    at = np.zeros(L, np.int64)
    path = [(0.0, at - 1)]
    while True:
        up = at + 1 < len(s)
        if not up.any():
            return path
        nxt = np.minimum(at + 1, len(s) - 1)
        rate = np.where(up, (C[np.arange(L), nxt] - C[np.arange(L), at]) / np.maximum(s[nxt] - s[at], 1e-12),
                        np.inf)
        at[int(np.argmin(rate))] += 1
        path.append((float(s[at].mean()), at - 1))


def bisect_path(path, within) -> int:
    """The last index of `path` whose allocation `within(i)` accepts (0, all dense, is taken as accepted),
    by bisection: the loss grows along the path."""
    lo, hi = 0, len(path)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo
