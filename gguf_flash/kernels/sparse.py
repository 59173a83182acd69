"""Sparse FFN kernels over neuron bundles (LLM in a flash, 3.1-3.3).

A bundle row is gate_i | up_i | down_i (down_i: column i of W_down, re-quantized as a row of n_embd).
The window keeps bundles in slots (capacity, bundle_bytes) uint8; `neuron_slot` maps a stored row to
its slot. Identity (tests/test_flash_runtime.py): every neuron selected = the dense FFN.
"""

import numpy as np
from numba import njit, prange

from .dispatch import axpy_row, dot_row
from .nn import FASTMATH, activate


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_rows(out, w, qt, x, xq):
    """out (n_rows,) = W @ x for a weight held outside the file map (e.g. resident gate rows)."""
    for r in prange(w.shape[0]):
        out[r] = dot_row(qt, w[r], x, xq)


@njit(cache=True, fastmath=FASTMATH)
def select_by_gate(active, gvals, hg, act, threshold):
    """Exact selection (gate-resident mode): rows with |act(hg[i])| > threshold.
    active (n_ff,) int32 and gvals (n_ff,) f32 receive the rows (increasing) and their gate values.
    Returns how many."""
    n = 0
    for i in range(hg.shape[0]):
        if abs(activate(hg[i], act)) > threshold:
            active[n] = i
            gvals[n] = hg[i]
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH)
def select_by_logit(active, z, offset, absolute):
    """Predicted selection: rows whose logit (|z| - offset, or z) is > 0. Returns how many."""
    n = 0
    for i in range(z.shape[0]):
        logit = abs(z[i]) - offset if absolute else z[i]
        if logit > 0.0:
            active[n] = i
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH)
def predictor_logits(z, tmp, x, a, b, bias):
    """z (n_ff,) = (x @ A) @ B + bias; tmp (r,) scratch; A (n_embd, r), B (r, n_ff) f32."""
    r = a.shape[1]
    for k in range(r):
        tmp[k] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        for k in range(r):
            tmp[k] += xi * a[i, k]
    for j in range(z.shape[0]):
        z[j] = bias[j]
    for k in range(r):
        t = tmp[k]
        for j in range(z.shape[0]):
            z[j] += t * b[k, j]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def sparse_ffn_range(partial, slots, neuron_slot, stage, stage_map, active, j0, j1, gvals, have_gate,
                     x, xq, types, offs, act, threshold):
    """partial[c] += the FFN contributions of positions j0 <= j < j1 of `active` with j % n_part == c.

    A row lives in a window slot (neuron_slot[row] >= 0: slots[neuron_slot[row]]) or in the staging
    buffer (stage[stage_map[row]]). Part c always adds its rows in increasing j, however the positions
    are cut into calls, so the sum (sum_partials) is bitwise the same whether every row sat in the window
    or most were streamed through staging in chunks: the cap never changes the logits.
    partial (n_part, n_embd) f32, zeroed by the caller before the first range; slots/stage
    (rows, slot_bytes) uint8; neuron_slot/stage_map (n_ff,) int32; active (>= j1,) int32; gvals
    (>= j1,) f32 gate values by position when have_gate; types (3,) int64; offs (4,) int64 byte offsets
    of gate, up, down inside a slot (gate empty when the slot holds only up|down)."""
    n_part = partial.shape[0]
    for c in prange(n_part):
        acc = partial[c]
        j = j0 + (c - j0 % n_part) % n_part
        while j < j1:
            a = active[j]
            s = neuron_slot[a]
            row = slots[s] if s >= 0 else stage[stage_map[a]]
            g = gvals[j] if have_gate else dot_row(types[0], row[offs[0]:offs[1]], x, xq)
            v = activate(g, act)
            if abs(v) > threshold:
                u = dot_row(types[1], row[offs[1]:offs[2]], x, xq)
                axpy_row(types[2], acc, v * u, row[offs[2]:offs[3]])
            j += n_part


@njit(cache=True)
def sum_partials(out, partial):
    """out (n_embd,) = sum over c of partial[c], in c order."""
    for i in range(out.shape[0]):
        s = np.float32(0.0)
        for c in range(partial.shape[0]):
            s += partial[c, i]
        out[i] = s
