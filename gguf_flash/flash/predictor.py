"""Low-rank activation predictors: which FFN neurons will be active for this token (numpy, and scipy's
partial eigensolver for the data-weighted basis).

LLM in a flash (Alizadeh et al. 2024), 3.1 "predictors"; DejaVu (Liu et al. 2023): a per-layer rank-r
map x (n_embd) -> A (n_embd, r) -> B (r, n_ff) -> one logit per neuron, trained on calibration tokens to
say which neurons are active, so only those are read from flash.

What "active" means (DESIGN.md section 1):
  relu           relu(gate_i . x) > 0
  silu, gelu     |act(gate_i . x)| > t, with a per-layer threshold t chosen by the caller for a target
                 sparsity (CATS, Lee et al. 2024; TEAL, Liu et al. 2024).

Two decision rules, both stored as the same three tensors (A, B, bias) plus one scalar `offset`:
  kind "linear"  logit = z                    z = (x @ A) @ B + bias; used for ReLU (active iff g > 0)
  kind "abs"     logit = |z| - offset         used for SiLU/GELU
Why "abs": |silu(g)| > t holds for g > c and also on silu's negative lobe (b > g > a, silu(g) >= -0.278),
and on SmolLM2 most active neurons sit on that lobe: at 50% sparsity, layer 3, 76% of the active
(token, neuron) pairs have g < 0 (measured on 4000 tokens of pydoc text). The inactive set is then a band
b <= g <= c around zero, so "active" is two-sided: |g - mid| > half-width. A logit monotone in g cannot
express that (ranking by the exact gate value gives precision 0.49 at 95% recall at density 0.50, no
better than guessing), while |z| - offset can (precision 1.00 with the exact gate value on that layer).
When t > 0.278 the lobe is gone and the rule degenerates to one-sided, which |z| - offset also covers
(z + bias stays positive).

Training: z is initialised from a truncated SVD of W_gate, weighted by the data (so x @ A @ B is the best
rank-r approximation of the gate pre-activation x @ W_gate.T on the calibration tokens), the per-neuron
scale and centre from the training labels; then A, B, bias (and offset) are trained with a
class-balanced binary cross-entropy and Adam on mini-batches. Finally one global margin is calibrated on
the validation split so that held-out recall >= target_recall; recall and precision are reported there.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError

log = logging.getLogger(__name__)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
DEFAULT_RANKS = (8, 16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------
# One BLAS thread while training
# ---------------------------------------------------------------------------------------------------

_OPENBLAS = []


def _openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS numpy bundles, or None; looked up once.
    (numpy has no public switch and threadpoolctl is not a dependency; tests/reference_forward.py
    uses this too.)"""
    if not _OPENBLAS:
        found = None
        libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
        for path in glob.glob(os.path.join(libs_dir, "*openblas*")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for pattern in ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_",
                            "openblas_{}_num_threads"):
                try:
                    get_n, set_n = getattr(lib, pattern.format("get")), getattr(lib, pattern.format("set"))
                except AttributeError:
                    continue
                get_n.restype, set_n.argtypes = ctypes.c_int, [ctypes.c_int]
                found = (get_n, set_n)
                break
            if found:
                break
        _OPENBLAS.append(found)
    return _OPENBLAS[0]


@contextlib.contextmanager
def single_threaded_blas():
    """Why: on this 2-core machine shared with other busy processes, OpenBLAS's spinning worker threads
    made the 576x1536 SVD take 18 s instead of 0.4 s (measured); the matmuls here are small anyway."""
    lib = _openblas()
    if lib is None:
        yield
        return
    get_n, set_n = lib
    previous = get_n()
    set_n(1)
    try:
        yield
    finally:
        set_n(previous)


# ---------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------

def _act(g: np.ndarray, activation: str) -> np.ndarray:
    """act(g) elementwise, float32 in, float32 out."""
    if activation == "silu":
        return g / (1.0 + np.exp(-np.clip(g, -80.0, 80.0)))
    if activation in ("gelu", "gelu_tanh"):
        # ggml_gelu, the tanh approximation (Gemma's GeGLU)
        return 0.5 * g * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (g + np.float32(0.044715) * g ** 3)))
    return np.maximum(g, 0.0)


class GateRows:
    """W_gate (n_ff, n_embd) float32 read ROWS rows at a time: an array, or rows made on demand
    (`rows(r0, r1)`: the converter dequantizes a quantized gate block by block rather than hold its
    float32 whole, 44 MiB on TinyLlama's 5632 x 2048 gate)."""
    ROWS = 512

    def __init__(self, shape, rows):
        self.shape = (int(shape[0]), int(shape[1]))
        self.rows = rows                       # rows(r0, r1) -> (r1 - r0, n_embd) f32

    @classmethod
    def of(cls, W) -> "GateRows":
        if isinstance(W, GateRows):
            return W
        return cls(W.shape, lambda r0, r1: W[r0:r1])

    def blocks(self):
        """(r0, (r1 - r0, n_embd) f32 rows) for the whole gate in ROWS-row blocks."""
        for r0 in range(0, self.shape[0], self.ROWS):
            yield r0, self.rows(r0, min(self.shape[0], r0 + self.ROWS))


def active_mask(X: np.ndarray, W_gate, threshold: float, activation: str) -> np.ndarray:
    """(n, n_ff) bool: neuron i active for token x. X (n, n_embd) f32 FFN inputs (after ffn_norm),
    W_gate (n_ff, n_embd) or a GateRows. silu/gelu: |act(gate_i . x)| > threshold; relu:
    relu(gate_i . x) > threshold (threshold 0 for the natural ReLU sparsity)."""
    X, W_gate = _check_x_w(X, W_gate)
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise InvalidArgumentError(f"threshold must be finite and >= 0, not {threshold}")
    out = np.empty((X.shape[0], W_gate.shape[0]), dtype=bool)
    for r0, W in W_gate.blocks():             # neuron blocks: the f32 temporaries stay a few MB
        for s in range(0, X.shape[0], 1024):
            G = X[s:s + 1024] @ W.T                                    # (<=1024, <=ROWS) f32
            out[s:s + 1024, r0:r0 + len(W)] = (G > threshold) if activation == "relu" else \
                (np.abs(_act(G, activation)) > threshold)
    return out


# ---------------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------------

def predictor_bytes(n_embd: int, rank: int, n_ff: int) -> int:
    """Bytes of a rank-r predictor as a flash GGUF stores it (and the runtime holds it): A (n_embd, r) and
    B (r, n_ff) float16, bias (n_ff,) float32."""
    return 2 * rank * (n_embd + n_ff) + 4 * n_ff


@dataclass
class Predictor:
    A: np.ndarray          # (n_embd, r) float32
    B: np.ndarray          # (r, n_ff) float32
    bias: np.ndarray       # (n_ff,) float32
    rank: int
    recall: float          # held-out: active neurons predicted active / active neurons
    precision: float       # held-out: predicted active that are active / predicted active
    kind: str = "linear"   # "linear": logit = z; "abs": logit = |z| - offset (z = x A B + bias)
    offset: float = 0.0    # only for kind "abs"; includes the calibrated margin
    seconds: float = 0.0   # training time (init + epochs + calibration)

    @property
    def n_bytes(self) -> int:
        """Bytes as stored in a flash GGUF: A and B in F16, bias in F32."""
        return predictor_bytes(self.A.shape[0], self.rank, self.B.shape[1])

    def scores(self, X: np.ndarray) -> np.ndarray:
        """(n, n_ff) float32 logits for X (n, n_embd); sigmoid(logit) > 0.5 means predicted active."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.A.shape[0]:
            raise InvalidArgumentError(f"X must be (n, {self.A.shape[0]}), not {X.shape}")
        Z = (X @ self.A) @ self.B                                      # (n, n_ff) f32
        Z += self.bias
        if self.kind == "abs":
            np.abs(Z, out=Z)
            Z -= np.float32(self.offset)
        return Z

    def predict(self, X: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(n, n_ff) bool: logit > margin (a negative margin trades precision for recall)."""
        return self.scores(X) > margin


def evaluate(pred: Predictor, X: np.ndarray, Y: np.ndarray) -> tuple[float, float]:
    """(recall, precision) of pred on tokens X (n, n_embd) with ground truth Y (n, n_ff) bool."""
    Y = _check_y(Y, np.asarray(X).shape[0], pred.B.shape[1])
    return _recall_precision(pred.predict(X), Y)


def _recall_precision(P: np.ndarray, Y: np.ndarray) -> tuple[float, float]:
    tp = np.count_nonzero(P & Y)
    n_pos, n_pred = np.count_nonzero(Y), np.count_nonzero(P)
    recall = tp / n_pos if n_pos else 1.0
    precision = tp / n_pred if n_pred else 1.0
    return float(recall), float(precision)


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------

def _check_shapes(X, W_gate):
    """(X as an array, W_gate as an array or the GateRows given), with their shapes checked."""
    X = np.asarray(X)
    W_gate = W_gate if isinstance(W_gate, GateRows) else np.asarray(W_gate)
    if X.ndim != 2 or len(W_gate.shape) != 2:
        raise InvalidArgumentError(f"X must be (n, n_embd) and W_gate (n_ff, n_embd); got {X.shape}, {W_gate.shape}")
    if X.shape[1] != W_gate.shape[1]:
        raise InvalidArgumentError(f"X has n_embd {X.shape[1]} but W_gate is {W_gate.shape} (n_ff, n_embd)")
    if X.shape[0] == 0:
        raise InvalidArgumentError("X holds no tokens")
    return X, W_gate


def _check_x_w(X, W_gate):
    """(X f32, W_gate as GateRows); an array W_gate is checked finite here, a GateRows's rows where the
    basis reads them (_gate_basis)."""
    X, W_gate = _check_shapes(X, W_gate)
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise InvalidArgumentError("X and W_gate must be finite")
    if isinstance(W_gate, np.ndarray):
        W_gate = W_gate.astype(np.float32, copy=False)
        if not np.isfinite(W_gate).all():
            raise InvalidArgumentError("X and W_gate must be finite")
    return X, GateRows.of(W_gate)


def _check_y(Y, n, n_ff):
    Y = np.asarray(Y)
    if Y.shape != (n, n_ff):
        raise InvalidArgumentError(f"Y must be (n, n_ff) = ({n}, {n_ff}), not {Y.shape}")
    return Y.astype(bool, copy=False)


def _check_split(X, Y, W_gate, name):
    X, W_gate = _check_x_w(X, W_gate)
    return X, _check_y(Y, X.shape[0], W_gate.shape[0]), W_gate


# ---------------------------------------------------------------------------------------------------
# Initialisation: data-weighted truncated SVD of W_gate, then per-neuron scale and centre
# ---------------------------------------------------------------------------------------------------

# The basis is the memory peak of a layer's training (n_embd^2 float64 matrices: ~100 MiB on TinyLlama's
# n_embd 2048): threads that train layers in parallel take turns here.
_BASIS_TURN = threading.Lock()


def gate_basis(X: np.ndarray, W_gate, k_max: int):
    """(P (n_embd, k), Q (k, n_ff)) f32 with x @ P[:, :r] @ Q[:r] the best rank-r approximation of
    x @ W_gate.T in the mean squared sense over the tokens X (n, n_embd) float16 or float32, for every
    r <= k = min(k_max, n_embd, n_ff). W_gate: (n_ff, n_embd) or a GateRows. One thread at a time.

    With C = X^T X / n: minimise ||X (W^T - A B)||_F = ||C^(1/2) (W^T - A B)||_F, so take the SVD
    C^(1/2) W^T = U S V^T and A = C^(-1/2) U_r, B = S_r V_r^T (Eckart-Young in the whitened space).
    U and S come from the eigenvectors of the small Gram matrix C^(1/2) W^T W C^(1/2) (n_embd x n_embd),
    and S V^T = U^T C^(1/2) W^T for the k rows needed: the full SVD of the (n_embd x n_ff) matrix cost
    ~10 s and ~0.5 GB per layer on TinyLlama's 2048 x 5632 gates.
    """
    X, W_gate = _check_shapes(X, W_gate)
    if isinstance(W_gate, np.ndarray):
        W_gate = W_gate.astype(np.float32, copy=False)
    with _BASIS_TURN:
        return _gate_basis(X, GateRows.of(W_gate), k_max)


# What importing scipy.linalg adds to the process (its modules and its own OpenBLAS): 22 MiB measured
# on this machine; the converter counts it from the first phase that imports it (head index or
# predictors) on.
SCIPY_BYTES = 24 * 1024 * 1024


def basis_bytes(n_embd: int, k: int) -> int:
    """The most _gate_basis holds at once besides its tokens: two n_embd^2 float64 matrices (C and its
    eigenvectors E, then E and M), a block of gate rows in float64 twice, and the k eigenvectors of M
    (dsyevr works in M's own storage, with 26 n doubles and 10 n ints besides)."""
    return 16 * n_embd ** 2 + 2 * 8 * GateRows.ROWS * n_embd + 8 * n_embd * k + 8 * 26 * n_embd + 4 * 10 * n_embd


def _second_moment(X, rows: int = 1024) -> np.ndarray:
    """(n_embd, n_embd) f64 C = X^T X / n in Fortran order, its upper triangle only, over `rows` tokens
    at a time (X may be float16: a block at a time in float32, then float64). BLAS's dsyrk adds each
    block's product in C's place: `C += Xb.T @ Xb` made an n_embd^2 temporary (32 MiB at n_embd 2048)."""
    from scipy.linalg.blas import dsyrk
    C = np.zeros((X.shape[1], X.shape[1]), np.float64, order="F")
    for r in range(0, len(X), rows):
        Xb = X[r:r + rows].astype(np.float32, copy=False)             # (<= rows, n_embd) f32
        if not np.isfinite(Xb).all():
            raise InvalidArgumentError("X and W_gate must be finite")
        C = dsyrk(1.0, Xb.astype(np.float64), beta=1.0, c=C, trans=1, lower=0, overwrite_c=1)
    C /= len(X)
    return C


def _eigh_in_place(S: np.ndarray, top: int | None = None, lower: bool = True):
    """(eigenvalues ascending, eigenvectors as columns) of the symmetric float64 S (its lower or upper
    triangle read), whose storage LAPACK overwrites (S is garbage after); only the `top` largest when
    given. Why scipy: numpy's eigh copies S and runs dsyevd, whose workspace is 2 n^2 doubles, and returns
    all n eigenvectors: 4 n^2 doubles besides S (128 MiB at n 2048, the TinyLlama converter's peak);
    dsyevr on S's own storage, asked for the top k, needs n k doubles and O(n) workspace."""
    from scipy.linalg import eigh
    n = len(S)
    subset = None if top is None else (n - top, n - 1)
    if not S.flags.f_contiguous:        # a C-ordered S is symmetric: S.T is S in Fortran order, no copy
        S, lower = S.T, not lower
    return eigh(S, lower=lower, overwrite_a=True, check_finite=False, subset_by_index=subset, driver="evr")


def _gate_basis(X, W: GateRows, k_max: int):
    """gate_basis in the eigenbasis of C = X^T X / n, so that no more than two n_embd^2 float64 matrices
    live at once: with C = E diag(lam) E^T, C^(1/2) W^T W C^(1/2) = E M E^T where M = G^T G, G = W E D,
    D = diag(sqrt(lam)) (G made a block of gate rows at a time); M = U' S^2 U'^T gives U = E U', hence
    A = C^(-1/2) U_k = E D^-1 U'_k and B = U_k^T C^(1/2) W^T = (E D U'_k)^T W^T."""
    n_embd, n_ff = X.shape[1], W.shape[0]
    k = min(int(k_max), n_embd, n_ff)
    C = _second_moment(X)                                              # (n_embd, n_embd) f64
    lam, E = _eigh_in_place(C, lower=False)                                       # E (n_embd, n_embd) f64
    del C
    d = np.sqrt(np.maximum(lam, 1e-6 * max(lam.max(), 1e-30)))         # (n_embd,) sqrt(eigenvalues)
    E *= d[None, :]
    ED = E                                                             # (n_embd, n_embd) f64 = E D
    del E
    from scipy.linalg.blas import dsyrk
    M = np.zeros((n_embd, n_embd), np.float64, order="F")              # its upper triangle: G^T G
    for _, Wb in W.blocks():                                           # G a block of rows at a time
        if not np.isfinite(Wb).all():
            raise InvalidArgumentError("X and W_gate must be finite")
        G = Wb.astype(np.float64) @ ED                                 # (rows, n_embd) f64
        M = dsyrk(1.0, G, beta=1.0, c=M, trans=1, lower=0, overwrite_c=1)   # M += G^T G, in place
    del Wb, G
    s2, U = _eigh_in_place(M, k, lower=False)                                     # the k largest S^2, ascending
    del M, s2
    U = U[:, ::-1]                                                     # (n_embd, k) U'_k, largest first
    R = (ED @ U).astype(np.float32)                                    # (n_embd, k) = C^(1/2) U_k
    ED /= (d * d)[None, :]                                             # E D^-1
    P = (ED @ U).astype(np.float32)                                    # (n_embd, k) = C^(-1/2) U_k
    del ED, U
    Q = np.empty((k, n_ff), np.float32)                                # (k, n_ff) = S_k V_k^T
    for r0, Wb in W.blocks():
        Q[:, r0:r0 + len(Wb)] = R.T @ Wb.T
    return P, Q


def _class_mean_std(X, Y, ids, A, B, rows: int = 256):
    """((mean, std) where Y is True, (mean, std) where it is False), per column of the rank-r gate
    estimate G = (X @ A) @ B over the tokens ids (0, 1 where a class is empty); X (n, n_embd) f32 and
    Y (n, n_ff) bool are taken `rows` ids at a time. G is made a block at a time: the whole (2048, n_ff)
    estimate (44 MiB on TinyLlama) was alive through the training loop, and was its peak."""
    n_ff = B.shape[1]
    s1 = np.zeros((2, n_ff), np.float32)          # per class (True, False): sum of G, of G^2
    s2 = np.zeros((2, n_ff), np.float32)
    cnt = np.zeros(n_ff, np.int64)                # tokens where Y is True
    n = len(ids)
    for r in range(0, n, rows):
        G = (X[ids[r:r + rows]] @ A) @ B                                # (<= rows, n_ff) f32
        M = Y[ids[r:r + rows]]
        cnt += M.sum(0)
        for c, mask in enumerate((M, ~M)):
            Gm = np.where(mask, G, np.float32(0.0))
            s1[c] += Gm.sum(0)
            Gm *= G
            s2[c] += Gm.sum(0)
    out = []
    for c, k in enumerate((cnt, n - cnt)):
        k = np.maximum(k, 1).astype(np.float32)
        mean = s1[c] / k
        var = np.maximum(s2[c] / k - mean * mean, 0.0)
        out.append((mean.astype(np.float32), np.sqrt(var).astype(np.float32) + np.float32(1e-6)))
    return out


def _init_head(X: np.ndarray, Y: np.ndarray, ids: np.ndarray, A: np.ndarray, B: np.ndarray, kind: str):
    """Per-neuron (scale (n_ff,), shift (n_ff,), offset) so that logit = kind(scale * g + shift) - offset
    separates Y (n, n_ff) bool from the rank-r gate estimate g = (x @ A) @ B, over the tokens ids of
    X (n, n_embd), reasonably before training."""
    (mu_on, sd_on), (mu_off, sd_off) = _class_mean_std(X, Y, ids, A, B)
    if kind == "linear":
        # boundary between the class means, weighted by their spreads; slope ~ 4 logits per std
        c = (mu_on * sd_off + mu_off * sd_on) / (sd_on + sd_off)
        s = np.float32(4.0) / (sd_on + sd_off)
        s = np.where(mu_on >= mu_off, s, -s)
        return s.astype(np.float32), (-s * c).astype(np.float32), 0.0
    # abs: inactive band mu_off +- 1.5 sd_off; |s (g - mid)| = offset at the band's edges
    offset = 2.0
    s = np.float32(offset) / (np.float32(1.5) * sd_off)
    return s.astype(np.float32), (-s * mu_off).astype(np.float32), offset


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

class _Adam:
    """Adam (Kingma & Ba 2015) over a list of float32 arrays, updated in place."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads, lr=None):
        self.t += 1
        lr = self.lr if lr is None else lr
        c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        step = np.float32(lr * np.sqrt(c2) / c1)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            p -= step * m / (np.sqrt(v) + np.float32(self.eps))


def _calibrate(logits: np.ndarray, Y: np.ndarray, target_recall: float) -> float:
    """A margin m, just below the largest with recall(logits > m) >= target_recall."""
    pos = logits[Y]                                                    # (n_pos,) f32
    if pos.size == 0:
        return 0.0
    k = int(np.floor((1.0 - target_recall) * pos.size))               # positives allowed below m
    k = min(max(k, 0), pos.size - 1)
    pos.partition(k)                                                   # pos[k]: the k-th smallest, in place
    # a little below pos[k], not the next float: folding m into bias/offset rounds in float32
    return float(pos[k]) - 1e-4 * (1.0 + abs(float(pos[k])))


def _train(X_train, Y_train, X_val, Y_val, P, Q, *, rank, kind, epochs, lr, batch, target_recall, seed):
    """Train one predictor from the basis (P, Q) of _gate_basis; returns a calibrated Predictor."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n, n_ff = Y_train.shape
    A = np.ascontiguousarray(P[:, :rank])                              # (n_embd, r) f32
    B = Q[:rank].copy()                                                # (r, n_ff) f32
    # per-neuron scale and shift of the rank-r gate estimate, from (a subsample of) the training tokens
    sub = rng.choice(n, size=min(n, 2048), replace=False)              # (m,) token ids
    s, shift, offset = _init_head(X_train, Y_train, sub, A, B, kind)
    B *= s
    bias = shift.astype(np.float32)                                    # (n_ff,) f32
    off = np.array([offset], dtype=np.float32)                         # (1,) f32, trained for "abs"

    # class balance: positives weighted by (negatives / positives), mean weight 1
    rate = float(np.clip(Y_train.mean(), 1e-4, 1 - 1e-4))
    w_pos, w_neg = np.float32(0.5 / rate), np.float32(0.5 / (1.0 - rate))

    params = [A, B, bias, off] if kind == "abs" else [A, B, bias]
    opt = _Adam(params, lr)
    n_steps = max(1, epochs * ((n + batch - 1) // batch))
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            Xb, Yb = X_train[idx], Y_train[idx]                        # (b, n_embd) f32, (b, n_ff) bool
            H = Xb @ A                                                 # (b, r)
            Z = H @ B + bias                                           # (b, n_ff)
            L = np.abs(Z) - off[0] if kind == "abs" else Z
            # d(weighted BCE)/d logit = w * (sigmoid(L) - y), averaged over tokens
            Pr = 1.0 / (1.0 + np.exp(-np.clip(L, -30.0, 30.0)))
            dL = np.where(Yb, (Pr - 1.0) * w_pos, Pr * w_neg) / np.float32(len(idx))
            dZ = dL * np.sign(Z) if kind == "abs" else dL
            grads = [Xb.T @ (dZ @ B.T), H.T @ dZ, dZ.sum(0)]
            if kind == "abs":
                grads.append(np.array([-dL.sum()], dtype=np.float32))
            # cosine decay of the step size: few epochs, so end quietly
            opt.step(grads, lr * 0.5 * (1.0 + np.cos(np.pi * step / n_steps)))
            step += 1

    pred = Predictor(A=A, B=B, bias=bias, rank=rank, recall=0.0, precision=0.0, kind=kind,
                     offset=float(off[0]))
    # fold the calibrated margin into offset/bias; float32 rounding of the folded logits can move a
    # boundary token, so recalibrate on the folded logits until predict() itself meets the target
    logits = pred.scores(X_val)                                        # (n_val, n_ff) f32
    for attempt in range(4):
        m = _calibrate(logits, Y_val, target_recall)
        if kind == "abs":
            pred.offset += m
        else:
            pred.bias -= np.float32(m)
        logits = None                     # (n_val, n_ff) f32 each: one at a time
        logits = pred.scores(X_val)
        pred.recall, pred.precision = _recall_precision(logits > 0, Y_val)
        if pred.recall >= target_recall:
            break
    pred.seconds = time.perf_counter() - t0
    return pred


def _resolve_kind(kind, Y_train):
    if kind in ("linear", "abs"):
        return kind
    if kind is None or kind == "auto":
        return "abs"
    raise InvalidArgumentError(f"kind must be 'linear', 'abs' or 'auto', not {kind!r}")


def _check_options(rank, epochs, lr, batch, target_recall, max_rank):
    if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= max_rank):
        raise InvalidArgumentError(f"rank must be an int in [1, {max_rank}], not {rank!r}")
    if not (isinstance(epochs, (int, np.integer)) and epochs >= 0):
        raise InvalidArgumentError(f"epochs must be an int >= 0, not {epochs!r}")
    if not (lr > 0 and np.isfinite(lr)):
        raise InvalidArgumentError(f"lr must be > 0, not {lr!r}")
    if not (isinstance(batch, (int, np.integer)) and batch >= 1):
        raise InvalidArgumentError(f"batch must be an int >= 1, not {batch!r}")
    if not 0.0 < target_recall <= 1.0:
        raise InvalidArgumentError(f"target_recall must be in (0, 1], not {target_recall!r}")


def train_predictor(X_train, Y_train, X_val, Y_val, W_gate, *, rank: int, epochs: int = 6, lr: float = 3e-3,
                    batch: int = 256, target_recall: float = 0.95, kind: str = "auto", seed: int = 0,
                    basis=None) -> Predictor:
    """Train a rank-`rank` predictor of Y (n, n_ff) bool from X (n, n_embd); W_gate (n_ff, n_embd) or a
    GateRows; basis: gate_basis(X_train, W_gate, k >= rank) when the caller made it already.

    kind: "linear" (logit = z; right for ReLU), "abs" (logit = |z| - offset; right for |act| > t
    thresholds of SiLU/GELU, see the module docstring) or "auto" (= "abs", which covers both).
    The returned predictor's margin is calibrated so recall >= target_recall on (X_val, Y_val), and
    recall/precision are measured there.
    """
    X_train, Y_train, W_gate = _check_split(X_train, Y_train, W_gate, "train")
    X_val, Y_val, _ = _check_split(X_val, Y_val, W_gate, "val")
    _check_options(rank, epochs, lr, batch, target_recall, min(W_gate.shape))
    t0 = time.perf_counter()
    with single_threaded_blas():
        P, Q = gate_basis(X_train, W_gate, int(rank)) if basis is None else basis
        pred = _train(X_train, Y_train, X_val, Y_val, P, Q, rank=int(rank), kind=_resolve_kind(kind, Y_train),
                      epochs=int(epochs), lr=float(lr), batch=int(batch), target_recall=float(target_recall),
                      seed=seed)
    pred.seconds = time.perf_counter() - t0
    return pred


def fit_smallest_rank(X_train, Y_train, X_val, Y_val, W_gate, *, target_recall: float = 0.95,
                      ranks=DEFAULT_RANKS, min_precision: float | None = None, precision_slack: float = 0.02,
                      max_seconds: float | None = None, epochs: int = 6, lr: float = 3e-3, batch: int = 256,
                      kind: str = "auto", seed: int = 0, basis=None) -> Predictor:
    """The smallest rank in `ranks` that is good enough, every candidate calibrated to recall >= target_recall
    on the validation split (so the ranks differ in the precision that recall costs).

    Good enough: precision >= min_precision when given; otherwise precision within `precision_slack` of
    the largest rank's (trained first as the ceiling); the smaller ranks are bisected (precision is about
    monotone in rank), so 1 + log2(len(ranks)) trainings. If none is good enough, the largest rank is
    returned with a logged warning; if max_seconds runs out, the smallest good rank found so far.
    basis: gate_basis(X_train, W_gate, max(ranks)) when the caller made it already (the converter makes
    it before the labels exist, so the two never share the memory).
    """
    X_train, Y_train, W_gate = _check_split(X_train, Y_train, W_gate, "train")
    X_val, Y_val, _ = _check_split(X_val, Y_val, W_gate, "val")
    max_rank = min(W_gate.shape)
    ranks = sorted({int(r) for r in ranks})
    if not ranks:
        raise InvalidArgumentError("ranks is empty")
    for r in ranks:
        _check_options(r, epochs, lr, batch, target_recall, max_rank)
    if min_precision is not None and not 0.0 <= min_precision <= 1.0:
        raise InvalidArgumentError(f"min_precision must be in [0, 1], not {min_precision!r}")
    kind = _resolve_kind(kind, Y_train)
    with single_threaded_blas():
        return _search(X_train, Y_train, X_val, Y_val, W_gate, ranks, target_recall, min_precision,
                       precision_slack, max_seconds, epochs, lr, batch, kind, seed, basis)


def _search(X_train, Y_train, X_val, Y_val, W_gate, ranks, target_recall, min_precision, precision_slack,
            max_seconds, epochs, lr, batch, kind, seed, basis):
    t0 = time.perf_counter()
    P, Q = gate_basis(X_train, W_gate, max(ranks)) if basis is None else basis   # shared by every rank

    def train(r):
        pred = _train(X_train, Y_train, X_val, Y_val, P, Q, rank=r, kind=kind, epochs=epochs, lr=lr,
                      batch=batch, target_recall=target_recall, seed=seed)
        log.debug("predictor rank %d: recall %.3f precision %.3f (%.2f s)", r, pred.recall, pred.precision,
                  pred.seconds)
        return pred

    # The largest rank first: it is the ceiling (precision rises with rank on real gates), then bisect
    # the sorted ranks for the smallest good one (precision is about monotone in rank): 1 + log2(len) fits.
    best = train(ranks[-1])                                            # ranks[hi]'s predictor
    goal = best.precision - precision_slack if min_precision is None else min_precision
    if best.precision < goal:
        log.warning("predictor: no rank in %s reached precision %.3f at recall %.2f; using rank %d "
                    "(precision %.3f)", ranks, goal, target_recall, ranks[-1], best.precision)
        return _done(best, t0)
    lo, hi = -1, len(ranks) - 1                                        # ranks[hi] is good, ranks[lo] not
    while hi - lo > 1:
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            log.warning("predictor rank search: time budget of %.1f s spent; using rank %d", max_seconds, ranks[hi])
            break
        mid = (lo + hi) // 2
        pred = train(ranks[mid])            # only the best so far is kept (a rank-256 one: 7.6 MiB)
        if pred.precision >= goal:
            hi, best = mid, pred
        else:
            lo = mid
        del pred
    return _done(best, t0)


def _done(pred, t0):
    pred.seconds = time.perf_counter() - t0
    return pred
