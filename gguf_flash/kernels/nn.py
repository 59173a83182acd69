"""Element-wise and attention kernels: RMSNorm, RoPE, activations, softmax attention over a KV cache.

Conventions (STYLE.md): output first, then inputs, then sizes; float32 everywhere; nothing allocated
inside. Every kernel has a numpy twin in tests/test_kernels_nn.py.
"""

import math

import numpy as np
from numba import njit, prange

from ..config import ACT_GELU_TANH, ACT_RELU, ROPE_NEOX
from .kvcache import kv_get
from .quant_basic import _u32_as_f32

FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}  # no nnan/ninf: -inf masks must work
SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
# Softmax weights exp(s - max) below exp(-80) = 1.8e-35 are taken as 0: beneath the float32 rounding of
# their sum (>= 1) and of every output, but their products with V would be subnormal floats, which x86
# computes ~100x slower (measured: 128 queries x 128 positions with scores 30x the usual spread, 30
# SmolLM2-sized layers, 78 ms before this floor, 29 ms with it, 20 ms at the usual spread).
SOFTMAX_FLOOR = np.float32(-80.0)


@njit(cache=True, fastmath=FASTMATH)
def rmsnorm(out, x, w, eps):
    """out (n,) = x / rms(x) * w; out may alias x."""
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    s = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * s * w[i]


@njit(cache=True, fastmath=FASTMATH)
def rmsnorm_heads(x, w, n_head, head_dim, eps):
    """In place: per-head RMSNorm of x (n_head * head_dim,) with weight w (head_dim,) (q/k norms)."""
    for h in range(n_head):
        o = h * head_dim
        ss = np.float32(0.0)
        for i in range(head_dim):
            ss += x[o + i] * x[o + i]
        s = np.float32(1.0) / np.sqrt(ss / np.float32(head_dim) + np.float32(eps))
        for i in range(head_dim):
            x[o + i] = x[o + i] * s * w[i]


@njit(cache=True, fastmath=FASTMATH)
def rope_cos_sin(cos, sin, pos, inv_freq):
    """cos, sin (rope_dim/2,) for position pos; inv_freq (rope_dim/2,) = base^(-2i/d) / freq_factor_i."""
    for i in range(inv_freq.shape[0]):
        theta = np.float64(pos) * np.float64(inv_freq[i])
        cos[i] = np.float32(math.cos(theta))
        sin[i] = np.float32(math.sin(theta))


@njit(cache=True, fastmath=FASTMATH)
def rope(x, cos, sin, n_head, head_dim, style):
    """In place on x (n_head * head_dim,). NORM rotates pairs (2i, 2i+1); NEOX rotates (i, i + d/2),
    d = 2 * len(cos) (may be < head_dim: the rest is left as is). llama.cpp ggml_rope_ext."""
    half = cos.shape[0]
    for h in range(n_head):
        o = h * head_dim
        if style == ROPE_NEOX:
            for i in range(half):
                a, b = x[o + i], x[o + i + half]
                x[o + i] = a * cos[i] - b * sin[i]
                x[o + i + half] = a * sin[i] + b * cos[i]
        else:
            for i in range(half):
                a, b = x[o + 2 * i], x[o + 2 * i + 1]
                x[o + 2 * i] = a * cos[i] - b * sin[i]
                x[o + 2 * i + 1] = a * sin[i] + b * cos[i]


LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693145751953125)       # ln 2 = LN2_HI + LN2_LO, LN2_HI with 12 zero low bits
LN2_LO = np.float32(1.428606765330187e-06)
ACT_FLUSH = np.float32(40.0)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def fast_exp(x):
    """exp(x) for float32 x, within 4.5 ulp (mean 1.5 ulp over [-87, 88]; checked in tests/test_nn.py):
    x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7, 2^n put into the exponent bits.
    Unlike np.exp (a libm call per element), a loop of these vectorizes. Clamped to [-87.3, 88.7]:
    below, the smallest normal float (~1.2e-38); above, inf."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.7))
    n = np.float32(np.floor(x * LOG2E + np.float32(0.5)))
    r = x - n * LN2_HI - n * LN2_LO
    p = np.float32(1.0 / 5040)
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _u32_as_f32(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def activate(g, act):
    """The FFN activation of g. GELU (tanh form) as g / (1 + exp(-2y)), y = sqrt(2/pi) (g + 0.044715 g^3),
    which is 0.5 g (1 + tanh(y)) exactly; SiLU g / (1 + exp(-g)). 0 where the exponent exceeds ACT_FLUSH
    (|value| < |g| e^-40 = 4e-18 |g|, which would only make subnormal products downstream). Loops that call this vectorize when
    compiled with error_model="numpy" (numba's default model checks every division for zero, which
    keeps LLVM from vectorizing; 4.5x on a 1536-wide SiLU row, measured)."""
    if act == ACT_RELU:
        return g if g > np.float32(0.0) else np.float32(0.0)
    if act == ACT_GELU_TANH:
        z = np.float32(-2.0) * SQRT_2_OVER_PI * (g + np.float32(0.044715) * g * g * g)
    else:  # SiLU
        z = -g
    a = g / (np.float32(1.0) + fast_exp(z))
    return a if z < ACT_FLUSH else np.float32(0.0)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def glu(out, gate, up, act, threshold):
    """out (n_ff,) = act(gate) * up where |act(gate)| > threshold, else 0 (CATS-style sparsity:
    threshold 0 is the dense FFN, since a neuron with act(gate) = 0 contributes nothing anyway)."""
    for i in range(out.shape[0]):
        a = activate(gate[i], act)
        v = a * up[i]
        out[i] = v if abs(a) > threshold else np.float32(0.0)


@njit(cache=True)
def search_slots(slot, edges, values):
    """slot[i] = how many of the sorted edges are < values[i]: np.searchsorted(edges, values, "left"),
    ~5x faster (the converter's quantiles count tens of millions of values against a few dozen edges)."""
    n_e = edges.shape[0]
    for i in range(values.shape[0]):
        v = values[i]
        lo, hi = 0, n_e
        while lo < hi:
            mid = (lo + hi) >> 1
            if edges[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        slot[i] = lo


@njit(cache=True, error_model="numpy")
def kth_smallest(a, k):
    """The k-th smallest value of a (0-based), found in place (a is reordered): Hoare's selection."""
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        p = a[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@njit(cache=True)
def _scores_buffer(scratch, n):
    """scratch[:n], refused when scratch is shorter (the compiled code checks no bounds)."""
    if scratch.shape[0] < n:
        raise ValueError("top-k rule: scratch shorter than the gate values")
    return scratch[:n]


@njit(cache=True, error_model="numpy")
def _largest_dropped(scores, keep):
    """Of scores (n,) (reordered): the largest among the n - keep smallest, so the scores above it are
    the keep largest (fewer on ties); keep >= n: -1 (every row)."""
    n = scores.shape[0]
    if keep >= n:
        return np.float32(-1.0)
    return kth_smallest(scores, n - max(keep, 0) - 1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def topk_threshold(gate, act, keep, scratch):
    """The gate criterion's per-token top-k rule as a threshold: the rows with |act(gate_i)| above it
    are the token's keep largest. gate (n_ff,) f32 gate values; scratch (>= n_ff,) f32 is overwritten."""
    s = _scores_buffer(scratch, gate.shape[0])
    for i in range(s.shape[0]):
        s[i] = abs(activate(gate[i], act))
    return _largest_dropped(s, keep)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def product_topk_threshold(gate, up, scale, act, keep, scratch):
    """topk_threshold for the product criterion: the rows with |act(gate_i) up_i| scale_i above it are
    the token's keep largest contributions."""
    s = _scores_buffer(scratch, gate.shape[0])
    for i in range(s.shape[0]):
        s[i] = abs(activate(gate[i], act) * up[i]) * scale[i]
    return _largest_dropped(s, keep)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def gate_rule(rule, gate, act, scratch):
    """One token's threshold on |act(gate_i)| under a selector's rule as the kernels take it
    (flash/selector.gate_rule): rule itself (t_l >= 0), or for -k the top-k rule's (topk_threshold)."""
    return rule if rule >= 0.0 else topk_threshold(gate, act, int(-rule), scratch)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def product_rule(rule, gate, up, scale, act, scratch):
    """gate_rule for the product criterion (product_topk_threshold for -k)."""
    return rule if rule >= 0.0 else product_topk_threshold(gate, up, scale, act, int(-rule), scratch)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def glu_product(out, gate, up, act, threshold, scale):
    """out (n_ff,) = h = act(gate) * up where |h| * scale[i] > threshold, else 0 (the product criterion:
    scale (n_ff,) f32 = the norms of W_down's columns, so |h_i| scale_i bounds neuron i's contribution)."""
    for i in range(out.shape[0]):
        h = activate(gate[i], act) * up[i]
        out[i] = h if abs(h) * scale[i] > threshold else np.float32(0.0)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def softmax_weight(d):
    """exp(d) for d = score - max <= 0, or 0 below SOFTMAX_FLOOR (no subnormal floats downstream)."""
    return fast_exp(d) if d > SOFTMAX_FLOOR else np.float32(0.0)


@njit(cache=True, fastmath=FASTMATH)
def _attend_head(out, q, k_cache, v_cache, scores, t0, t1, kv_off, head_dim, scale):
    """out (head_dim,) = softmax(q . K[t0:t1]^T * scale) V[t0:t1] for one head; scores (>= t1,) scratch.
    K and V rows are taken as contiguous 1-d slices: LLVM vectorizes those loops (2.7x measured at
    256 positions) where 2-d indexing with an offset stayed scalar."""
    m = -np.inf
    for t in range(t0, t1):
        kr = k_cache[t, kv_off:kv_off + head_dim]
        s = np.float32(0.0)
        for i in range(head_dim):
            s += q[i] * kv_get(kr, i)
        s *= scale
        scores[t] = s
        if s > m:
            m = s
    total = np.float32(0.0)
    for t in range(t0, t1):
        e = softmax_weight(scores[t] - m)
        scores[t] = e
        total += e
    inv = np.float32(1.0) / total
    for i in range(head_dim):
        out[i] = np.float32(0.0)
    for t in range(t0, t1):
        p = scores[t] * inv
        if p == 0:
            continue
        vr = v_cache[t, kv_off:kv_off + head_dim]
        for i in range(head_dim):
            out[i] += p * kv_get(vr, i)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention(out, q, k_cache, v_cache, scores, pos, window, n_head, n_head_kv, head_dim, scale):
    """One query token at `pos` over cache rows [0, pos] (or the last `window` when window > 0).
    out, q (n_head * head_dim,); k_cache, v_cache (n_ctx, n_head_kv * head_dim); scores (n_head, n_ctx)."""
    t0 = max(0, pos - window + 1) if window > 0 else 0
    group = n_head // n_head_kv
    for h in prange(n_head):
        _attend_head(out[h * head_dim:(h + 1) * head_dim], q[h * head_dim:(h + 1) * head_dim],
                     k_cache, v_cache, scores[h], t0, pos + 1, (h // group) * head_dim, head_dim, scale)


QB = 4   # query tokens per attention_batch task: each K/V row is read and decoded once for all four


@njit(cache=True, inline="always")
def _decode_row(out, cache, t, kv_off):
    """out (head_dim,) f32 = cache row t's head at kv_off (F32 or F16 bits)."""
    row = cache[t, kv_off:kv_off + out.shape[0]]
    for i in range(out.shape[0]):
        out[i] = kv_get(row, i)


@njit(cache=True, inline="always")
def _sees(t, pos, window):
    """Whether the query at pos attends to cache position t (causal, within a sliding window)."""
    return t <= pos and (window <= 0 or t >= pos - window + 1)


@njit(cache=True, fastmath=FASTMATH)
def _attend_block(out, q, k_cache, v_cache, scores, j0, nq, pos0, window, h, kv_off, head_dim, scale, n_head):
    """Heads h of query tokens j0 .. j0 + nq - 1 (positions pos0 + j) over their causal ranges of the
    cache: each K and V row in the union of the ranges is decoded once and used by every query whose
    range holds it. Per query the sums run over t and i in the same order as _attend_head.
    out, q (n_tok, n_head * head_dim); scores (QB, >= pos0 + n_tok) scratch: row b for query j0 + b."""
    c0 = h * head_dim
    kr = np.empty(head_dim, np.float32)
    lo = pos0 + j0 - window + 1 if window > 0 else 0
    lo = max(0, lo)
    hi = pos0 + j0 + nq                      # exclusive: the last query's position + 1
    m = np.full(QB, -np.inf, np.float32)
    for t in range(lo, hi):
        _decode_row(kr, k_cache, t, kv_off)
        for b in range(nq):
            if not _sees(t, pos0 + j0 + b, window):
                continue
            qq = q[j0 + b, c0:c0 + head_dim]
            s = np.float32(0.0)
            for i in range(head_dim):
                s += qq[i] * kr[i]
            s *= scale
            scores[b, t] = s
            if s > m[b]:
                m[b] = s
    for b in range(nq):
        pos = pos0 + j0 + b
        t0 = max(0, pos - window + 1) if window > 0 else 0
        sc = scores[b]
        total = np.float32(0.0)
        for t in range(t0, pos + 1):
            e = softmax_weight(sc[t] - m[b])
            sc[t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(t0, pos + 1):
            sc[t] *= inv
        o = out[j0 + b, c0:c0 + head_dim]
        for i in range(head_dim):
            o[i] = np.float32(0.0)
    for t in range(lo, hi):
        _decode_row(kr, v_cache, t, kv_off)
        for b in range(nq):
            if not _sees(t, pos0 + j0 + b, window):
                continue
            p = scores[b, t]
            if p == 0:
                continue
            o = out[j0 + b, c0:c0 + head_dim]
            for i in range(head_dim):
                o[i] += p * kr[i]


def batch_score_rows() -> int:
    """Rows of attention_batch's scores scratch: QB per lane, a lane per thread numba may run."""
    import numba
    return QB * max(2, numba.config.NUMBA_NUM_THREADS)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention_batch(out, q, k_cache, v_cache, scores, pos0, window, n_head, n_head_kv, head_dim, scale):
    """A batch of query tokens at positions pos0 .. pos0 + n_tok - 1 (their K/V already in the cache),
    QB queries per task so each cache row is decoded once per QB queries.
    out, q (n_tok, n_head * head_dim); scores (batch_score_rows(), >= pos0 + n_tok) scratch: QB rows per
    lane, each lane running every n_lanes-th task (so the scratch does not grow with the batch)."""
    n_tok = q.shape[0]
    group = n_head // n_head_kv
    n_blk = (n_tok + QB - 1) // QB
    n_lanes = scores.shape[0] // QB
    for lane in prange(n_lanes):
        for task in range(lane, n_blk * n_head, n_lanes):
            blk, h = task // n_head, task % n_head
            j0 = blk * QB
            _attend_block(out, q, k_cache, v_cache, scores[lane * QB:(lane + 1) * QB], j0, min(QB, n_tok - j0),
                          pos0, window, h, (h // group) * head_dim, head_dim, scale, n_head)
