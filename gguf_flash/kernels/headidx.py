"""Kernels of the output head's index (flash/head_index.py, built by flash/head_build.py): the preview
logits and their mean, the rows to read, and the exact logits of the rows read."""

import numpy as np
from numba import njit, prange

from .dispatch import dot_row
from .quant_basic import FASTMATH, _u16_as_f16_to_f32


PV_BLOCK = 1024   # preview rows per parallel block


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def preview_logits(pv, part, y, h, basis, preview, scale):
    """pv (n_vocab,) = preview logits (head_build.py); returns their mean. part (ceil(n_vocab / PV_BLOCK),)
    f32 scratch (per-block sums); y (r,) scratch; h (n_embd,) normed hidden state; basis (r, n_embd) f32;
    preview (n_vocab, r) int8; scale (n_vocab,) f16 bits (uint16)."""
    r, d = basis.shape
    for k in range(r):
        acc = np.float32(0)
        for j in range(d):
            acc += basis[k, j] * h[j]
        y[k] = acc
    V = preview.shape[0]
    n_blocks = (V + PV_BLOCK - 1) // PV_BLOCK
    for b in prange(n_blocks):
        tot = np.float32(0)
        for i in range(b * PV_BLOCK, min(V, b * PV_BLOCK + PV_BLOCK)):
            acc = np.float32(0)
            for k in range(r):
                acc += np.float32(preview[i, k]) * y[k]
            p = acc * _u16_as_f16_to_f32(scale[i])
            pv[i] = p
            tot += p
        part[b] = tot
    tot = np.float64(0)
    for b in range(n_blocks):
        tot += part[b]
    return np.float32(tot / V)


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
def rows_above(out, pv, thr, mark):
    """out = ids (increasing) of the rows whose preview is above thr and mark == 0; returns how many."""
    n = 0
    for i in range(pv.shape[0]):
        if pv[i] > thr and mark[i] == 0:
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


@njit(cache=True)
def gather(out, src, row):
    """out[t] = src[row[t]]: logits from the head's stored row order to token order (flash/head.py;
    row[t] is token t's stored row). Writing in order and reading at random: the scatter it replaced
    (out[order[j]] = src[j]) took 52 us for 49,152 logits, this 20 (one thread, in cache)."""
    for t in range(row.shape[0]):
        out[t] = src[row[t]]
