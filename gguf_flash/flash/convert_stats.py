"""What the converter measures on the calibration states of one layer (convert.py, phase 1): the weights
dequantized a block of rows at a time (never a whole float matrix), the |act(gate . x)| and product
scores, their quantiles and counts per neuron (SparsityStats), and the release of freed memory between
layers (the converter's RSS target counts it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, quants

from ..config import ACT_GELU_TANH, ACT_RELU
from ..kernels import release_compiler_pages
from .convert_ram import NEURON_BLOCK
from .predictor import GateRows
from .quantile import quantiles


def dequant(f, name) -> np.ndarray:
    """(n_rows, n_cols) float32 of a whole 2-D weight, NEURON_BLOCK rows at a time (tests; the converter
    itself reads the gate through gate_rows)."""
    info = f.tensor(name)
    out = np.empty((info.n_rows, info.ne[0]), np.float32)
    for r0 in range(0, info.n_rows, NEURON_BLOCK):
        D = dequant_rows(f, name, r0, r0 + NEURON_BLOCK)
        out[r0:r0 + len(D)] = D
    return out


def gate_rows(f, name) -> GateRows:
    """A 2-D weight as (n_rows, n_cols) float32 rows dequantized block by block when read (predictor.py),
    never whole: a TinyLlama gate in float32 is 44 MiB, per training thread."""
    info = f.tensor(name)
    return GateRows((info.n_rows, info.ne[0]), lambda r0, r1: dequant_rows(f, name, r0, r1))


def dequant_rows(f, name, r0, r1) -> np.ndarray:
    """(r1 - r0, n_cols) float32 of rows r0..r1 of a 2-D weight."""
    info = f.tensor(name)
    return quants.dequantize(f.raw(name)[r0:r1], GGMLQuantizationType(info.qtype)).astype(np.float32, copy=False)


def _down_norms(f, il, n_ff) -> np.ndarray:
    """(n_ff,) f32: the norm of each neuron's down column (the product criterion's scale)."""
    name = f"blk.{il}.ffn_down.weight"
    ss = np.zeros(n_ff, np.float64)
    for r0 in range(0, f.tensor(name).n_rows, NEURON_BLOCK):
        D = dequant_rows(f, name, r0, r0 + NEURON_BLOCK)                    # (<= block, n_ff)
        ss += np.einsum("ij,ij->j", D, D, dtype=np.float64)
    return np.sqrt(ss).astype(np.float32)


def _gate_scores(f, il, X, act, n_ff) -> np.ndarray:
    """(n, n_ff) f32 |act(gate_i . x)| for the rows of X (n, n_embd); the gate dequantized NEURON_BLOCK
    rows at a time (the product criterion's scores: _times_up of these)."""
    out = np.empty((len(X), n_ff), np.float32)
    for r0 in range(0, n_ff, NEURON_BLOCK):
        r1 = min(n_ff, r0 + NEURON_BLOCK)
        out[:, r0:r1] = _act_abs(X @ dequant_rows(f, f"blk.{il}.ffn_gate.weight", r0, r1).T, act)
    return out


def _times_up(f, il, X, A, up_scale) -> None:
    """A (n, n_ff) *= |up_i . x| * up_scale_i, in place."""
    for r0 in range(0, A.shape[1], NEURON_BLOCK):
        r1 = min(A.shape[1], r0 + NEURON_BLOCK)
        A[:, r0:r1] *= np.abs(X @ dequant_rows(f, f"blk.{il}.ffn_up.weight", r0, r1).T)
        A[:, r0:r1] *= up_scale[r0:r1]


def _column_counts(A, thresholds, rows: int = 512) -> np.ndarray:
    """(len(thresholds), n_ff) int64: per column of A (n, n_ff), how many rows exceed each threshold;
    `rows` rows at a time (a whole (n, n_ff) bool per threshold was 17 MiB on TinyLlama)."""
    out = np.zeros((len(thresholds), A.shape[1]), np.int64)
    for r in range(0, len(A), rows):
        for k, t in enumerate(thresholds):
            out[k] += np.count_nonzero(A[r:r + rows] > t, axis=0)
    return out


def _product_share(f, il, X, act, up_scale, thresholds) -> np.ndarray:
    """(len(thresholds),) float: the share of (token, neuron) pairs of X (n, n_embd) whose product score
    |act(gate_i . x) (up_i . x)| * up_scale_i exceeds each threshold, NEURON_BLOCK neurons at a time
    (the same products as _times_up's, never all at once)."""
    n_ff = len(up_scale)
    count = np.zeros(len(thresholds), np.int64)
    for r0 in range(0, n_ff, NEURON_BLOCK):
        r1 = min(n_ff, r0 + NEURON_BLOCK)
        P = _act_abs(X @ dequant_rows(f, f"blk.{il}.ffn_gate.weight", r0, r1).T, act)    # (n, <= block)
        P *= np.abs(X @ dequant_rows(f, f"blk.{il}.ffn_up.weight", r0, r1).T)
        P *= up_scale[r0:r1]
        for k, t in enumerate(thresholds):
            count[k] += np.count_nonzero(P > t)
    return count / (len(X) * n_ff)


@dataclass
class SparsityStats:
    """Per-layer statistics of both criteria, filled by the calibration pass a layer at a time (`add`):
    q (n_layer, grid) the |act(g)| quantiles of the training tokens; qp the product's; dn (n_layer, n_ff)
    the down columns' norms; p_count (n_layer, grid + 1, n_ff) how many training tokens choose each
    neuron by the product at threshold 0 and at each grid quantile; p_held (n_layer, grid + 1) the
    held-out share chosen (frequencies and layer sparsity once a sparsity is chosen)."""
    f: object
    cfg: object
    grid: np.ndarray
    product: bool

    def __post_init__(self):
        L, G, n_ff = self.cfg.n_layer, len(self.grid), self.cfg.n_ff
        self.q = np.zeros((L, G), np.float32)
        self.qp = np.zeros((L, G), np.float32)
        self.dn = np.zeros((L, n_ff), np.float32) if self.product else None
        self.p_count = np.zeros((L, G + 1, n_ff), np.int32) if self.product else None
        self.p_held = np.zeros((L, G + 1)) if self.product else None

    def add(self, il, X, n_train):
        release_compiler_pages()   # the pass's kernels are loaded by now: LLVM's ~70 MiB need not stay
        act, f, n_ff = self.cfg.activation, self.f, self.cfg.n_ff
        if act == ACT_RELU:
            return
        Xt, Xv = X[:n_train], X[n_train:]
        A = _gate_scores(f, il, Xt, act, n_ff)                             # (n_train, n_ff)
        self.q[il] = quantiles(A, self.grid)       # np.quantile's, without its copy of A (this phase's peak)
        if self.product:
            self.dn[il] = _down_norms(f, il, n_ff)
            _times_up(f, il, Xt, A, self.dn[il])                               # |act(g) u| ||down_i||
            self.qp[il] = quantiles(A, self.grid)
            thresholds = (0.0, *self.qp[il])
            self.p_count[il] = _column_counts(A, thresholds)
            self.p_held[il] = _product_share(f, il, Xv, act, self.dn[il], thresholds)   # held-out tokens
        del A
        release_freed_memory()


def release_freed_memory():
    """Hand freed heap memory back to the OS (glibc malloc_trim), and LLVM's code pages (kernels.
    release_compiler_pages: ~70 MiB, which loading a cached kernel faults back in; the model releases
    them only after its first whole pass, so they sat in the calibration's RSS). Freed numpy temporaries
    of a few MB stay in glibc's per-thread arenas otherwise (its mmap threshold grows after the first
    large free), and RSS, which the converter's memory target counts, keeps them."""
    release_compiler_pages()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _act_abs(G, act):
    if act == ACT_RELU:
        return np.maximum(G, 0)
    if act == ACT_GELU_TANH:
        return np.abs(0.5 * G * (1 + np.tanh(0.7978845608 * (G + 0.044715 * G ** 3))))
    return np.abs(G / (1 + np.exp(-G)))
