"""Kernels of the output head's index (flash/head_index.py, built by flash/head_build.py): the preview
logits and their calibrated bounds, the rows to read, and the exact logits of the rows read."""

import numpy as np
from numba import njit, prange

from .dispatch import dot_row
from .quant_basic import FASTMATH, _u16_as_f16_to_f32


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def preview_bounds(pv, bnd, y, u, h, basis, whiten, colscale, preview, scale, sigma, z):
    """pv (n_vocab,) = preview logits, bnd (n_vocab,) = pv + z * sigma * s(h) (head_build.py).
    y (r,), u (n_embd,) scratch; h (n_embd,) normed hidden state; basis (r, n_embd) f32; whiten
    (n_embd, n_embd) and scale, sigma (n_vocab,) f16 bits (uint16); preview (n_vocab, r) int8."""
    r, d = basis.shape
    for k in range(r):
        acc = np.float32(0)
        for j in range(d):
            acc += basis[k, j] * h[j]
        y[k] = acc
    for i in prange(d):
        acc = np.float32(0)
        for j in range(d):
            acc += _u16_as_f16_to_f32(whiten[i, j]) * h[j]
        u[i] = acc
    s2 = np.float32(0)
    for i in range(d):
        s2 += u[i] * u[i]
    for k in range(r):
        yk = y[k] / colscale[k]
        s2 -= yk * yk
    s = np.float32(np.sqrt(max(s2, np.float32(0)) / (d - r))) + np.float32(1e-6)
    zs = np.float32(z) * s
    V = preview.shape[0]
    n_blocks = (V + 1023) // 1024
    for b in prange(n_blocks):
        for i in range(b * 1024, min(V, b * 1024 + 1024)):
            acc = np.float32(0)
            for k in range(r):
                acc += np.float32(preview[i, k]) * y[k]
            p = acc * _u16_as_f16_to_f32(scale[i])
            pv[i] = p
            bnd[i] = p + zs * _u16_as_f16_to_f32(sigma[i])


@njit(cache=True)
def top_rows(out, best, vals):
    """out[:m] = ids of the m = len(best) largest vals, in increasing id order (best: scratch);
    returns m (n if fewer)."""
    n = vals.shape[0]
    m = min(best.shape[0], n)
    k = 0
    for i in range(n):
        v = vals[i]
        if k < m:
            j = k
            k += 1
        elif v > vals[best[m - 1]]:
            j = m - 1
        else:
            continue
        while j > 0 and vals[best[j - 1]] < v:   # keep best sorted by value, descending
            best[j] = best[j - 1]
            j -= 1
        best[j] = i
    out[:m] = np.sort(best[:m])
    return m


@njit(cache=True)
def rows_above(out, bnd, thr, mark):
    """out = ids (increasing) of the rows whose bound is above thr and mark == 0; returns how many."""
    n = 0
    for i in range(bnd.shape[0]):
        if bnd[i] > thr and mark[i] == 0:
            out[n] = i
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def exact_rows(logits, mark, ids, rows, qt, x, xq, tset):
    """logits[ids[k]] = rows[k] . x for k < len(ids) (rows (n, row_bytes) uint8 of ggml type qt, x the
    normed state and xq its 8-bit blocks), and mark them read."""
    for k in prange(ids.shape[0]):
        logits[ids[k]] = dot_row(qt, rows[k], x, xq, tset)
        mark[ids[k]] = 1


@njit(cache=True)
def kth_largest(logits, ids, k):
    """The k-th largest of logits[ids] (k >= 1; the smallest when there are fewer)."""
    v = np.sort(logits[ids])
    return v[max(0, v.shape[0] - k)]


@njit(cache=True)
def clear_marks(mark, ids):
    for k in range(ids.shape[0]):
        mark[ids[k]] = 0
