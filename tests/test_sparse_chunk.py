"""The prompt chunk's sparse FFN kernel (kernels/sparse.sparse_ffn_chunk) against a numpy twin built
from gguf.quants' dequantization: each token adds exactly the rows it chose, with the gate from the
bundle or from resident gate values, and the sum is bitwise the same however the union is cut."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from gguf_flash.kernels import dispatch, sparse
from gguf_flash.config import ACT_GELU_TANH as ACT_GELU, ACT_RELU, ACT_SILU
from gguf_flash.flash.ffn import NO_TABLES
from gguf_flash.kernels.quant_basic import MM_ROWS

N_EMBD, N_FF, T = 64, 96, 9


def _np_act(g, act):
    if act == ACT_SILU:
        return g / (1 + np.exp(-g))
    if act == ACT_RELU:
        return np.maximum(g, 0)
    return 0.5 * g * (1 + np.tanh(0.7978845608 * (g + 0.044715 * g ** 3)))


def _case(qt, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((N_FF, N_EMBD)).astype(np.float32) for _ in range(3)]
    q = [quantize(p, qt) for p in parts]                       # (N_FF, row_bytes) uint8 each (F16: halves)
    deq = [dequantize(x, qt).astype(np.float32) for x in q]
    q = [x.view(np.uint8) for x in q]
    rows = np.ascontiguousarray(np.concatenate(q, axis=1))     # bundle rows gate | up | down
    offs = np.cumsum([0] + [x.shape[1] for x in q]).astype(np.int64)
    XB = rng.standard_normal((T, N_EMBD)).astype(np.float32)
    MK = (rng.random((T, N_FF)) < 0.4).astype(np.uint8)
    MK[:, 5] = 0                                               # a row nobody chose
    HG = (XB @ deq[0].T).astype(np.float32)                    # resident gate values
    return rows, deq, offs, XB, MK, HG


def _reference(deq, XB, MK, HG, known, act, thr):
    if known == sparse.KNOWN_H:                               # HG holds the neurons' values themselves
        return (np.where(MK > 0, HG, 0.0) @ deq[2]).astype(np.float32)
    g = HG if known == sparse.KNOWN_GATE else XB @ deq[0].T
    v = _np_act(g, act)
    h = np.where((MK > 0) & (np.abs(v) > thr), v * (XB @ deq[1].T), 0.0)
    return (h @ deq[2]).astype(np.float32)                    # (T, N_EMBD)


def _run(rows, offs, XB, MK, HG, known, act, thr, qt, cuts, in_window, T_=T):
    """The kernel over the union, cut at `cuts`; rows in_window sit in 'slots', the rest in 'staging'."""
    union = np.zeros(N_FF, np.int32)
    n = sparse.union_rows(union, MK)
    n_part = 2
    slot_map = np.full(N_FF, -1, np.int32)
    stage_map = np.full(N_FF, -1, np.int32)
    slots = np.zeros((N_FF, rows.shape[1]), np.uint8)
    stage = np.zeros((N_FF, rows.shape[1]), np.uint8)
    for k, a in enumerate(union[:n]):
        if in_window(a):
            slot_map[a] = k
            slots[k] = rows[a]
        else:
            stage_map[a] = k
            stage[k] = rows[a]
    PART = np.zeros((n_part, T_, N_EMBD), np.float32)
    DEC = np.zeros((n_part, 3, MM_ROWS, N_EMBD), np.float32)
    H = np.zeros((n_part, 2, T_, MM_ROWS), np.float32)
    types = np.array([qt, qt, qt], np.int64)
    bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
    for p0, p1 in zip(bounds[:-1], bounds[1:]):
        sparse.sparse_ffn_chunk(PART, DEC, H, slots, slot_map, stage, stage_map, union, p0, p1, MK, HG,
                                known, XB, XB, types, offs, NO_TABLES, act, np.float32(thr), dispatch.ALL_TYPES,
                                (None, None))
    out = np.zeros((T_, N_EMBD), np.float32)
    sparse.sum_parts_chunk(out, PART)
    return out, union[:n]


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_0, Q.F16])
@pytest.mark.parametrize("known,act,thr", [(sparse.KNOWN_NONE, ACT_SILU, 0.0), (sparse.KNOWN_GATE, ACT_SILU, 0.05),
                                           (sparse.KNOWN_NONE, ACT_RELU, 0.1), (sparse.KNOWN_GATE, ACT_GELU, 0.0),
                                           (sparse.KNOWN_H, ACT_SILU, 0.0)])
def test_chunk_kernel_equals_numpy(qt, known, act, thr):
    rows, deq, offs, XB, MK, HG = _case(qt, seed=int(qt) * 7 + act)
    got, union = _run(rows, offs, XB, MK, HG, known, act, thr, int(qt), [], lambda a: True)
    assert 5 not in union and len(union) == int((MK.max(0) > 0).sum())
    want = _reference(deq, XB, MK, HG, known, act, thr)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_chunk_kernel_sum_is_the_same_however_the_union_is_cut():
    """The cap decides which rows sit in the window and where the staging parts end, never the sum; nor
    do the other tokens of the chunk (a token's rows are summed alike in a chunk of 2 or of 9)."""
    rows, deq, offs, XB, MK, HG = _case(Q.Q8_0, seed=11)
    whole, _ = _run(rows, offs, XB, MK, HG, sparse.KNOWN_NONE, ACT_SILU, 0.02, int(Q.Q8_0), [], lambda a: True)
    for cuts, in_window in [([7, 30, 31, 60], lambda a: a % 3 == 0), ([1, 2, 3], lambda a: False),
                            ([40], lambda a: a < 20)]:
        got, _ = _run(rows, offs, XB, MK, HG, sparse.KNOWN_NONE, ACT_SILU, 0.02, int(Q.Q8_0), cuts, in_window)
        np.testing.assert_array_equal(got, whole)
    pair, _ = _run(rows, offs, XB[:2].copy(), MK[:2].copy(), HG[:2].copy(), sparse.KNOWN_NONE, ACT_SILU, 0.02, int(Q.Q8_0),
                   [5], lambda a: a % 2 == 0, T_=2)
    np.testing.assert_array_equal(pair, whole[:2])


def test_mask_and_union_of_a_chunk():
    HG = np.array([[0.5, -2.0, 0.01, 3.0], [0.0, 0.0, 0.2, -0.01]], np.float32)
    MK = np.zeros(HG.shape, np.uint8)
    sparse.mask_by_gate(MK, HG, ACT_RELU, 0.1, np.zeros(HG.shape[1], np.float32))
    np.testing.assert_array_equal(MK, [[1, 0, 0, 1], [0, 0, 1, 0]])
    union = np.zeros(4, np.int32)
    assert sparse.union_rows(union, MK) == 3 and list(union[:3]) == [0, 2, 3]
    mk = np.zeros(4, np.uint8)
    sparse.mask_by_logit(mk, np.array([0.5, -2.0, 0.01, 3.0], np.float32), 1.0, True)
    np.testing.assert_array_equal(mk, [0, 1, 0, 1])


def test_per_token_top_k_rule_keeps_each_tokens_largest():
    """The gate criterion's top-k rule (a negative threshold -k): each token keeps exactly its own k
    largest |act(g)|, in a chunk's mask and as nn.topk_threshold's threshold (quickselect against a
    sort, ties and sizes 1 and 2 included)."""
    from gguf_flash.kernels.nn import kth_smallest, topk_threshold
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100, 1536):
        for _ in range(10):
            a = rng.standard_normal(n).astype(np.float32)
            if n > 4:
                a[:3] = a[3]
            k = int(rng.integers(0, n))
            assert kth_smallest(a.copy(), k) == np.sort(a)[k]
    HG = (rng.standard_normal((5, 256)) * 2).astype(np.float32)
    MK = np.zeros(HG.shape, np.uint8)
    sparse.mask_by_gate(MK, HG, ACT_SILU, -40.0, np.zeros(HG.shape[1], np.float32))
    act = np.abs(HG / (1 + np.exp(-HG.astype(np.float64))))
    for j in range(5):
        assert MK[j].sum() == 40
        assert set(np.flatnonzero(MK[j])) == set(np.argsort(-act[j])[:40])
        assert topk_threshold(HG[j], ACT_SILU, 40, np.zeros(256, np.float32)) == pytest.approx(np.sort(act[j])[-41],
                                                                                             rel=1e-5)
    assert topk_threshold(HG[0], ACT_SILU, 256, np.zeros(256, np.float32)) < 0     # every row
    # the product criterion's: each token's 40 largest |act(g) u| scale; HG then holds h
    U = rng.standard_normal((5, 256)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 256).astype(np.float32)
    H = HG.copy()
    sparse.mask_by_product(MK, H, U, scale, ACT_SILU, -40.0, np.zeros(256, np.float32))
    h = HG / (1 + np.exp(-HG.astype(np.float64))) * U
    np.testing.assert_allclose(H, h, rtol=1e-5, atol=1e-6)
    for j in range(5):
        assert MK[j].sum() == 40 and set(np.flatnonzero(MK[j])) == set(np.argsort(-np.abs(h[j]) * scale)[:40])


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_round_q8_is_what_the_integer_dot_products_see(qt):
    """A float dot with round_q8(x) computes the decode path's integer dot product (quantize_x + dot_row)
    up to float rounding: prompt chunks use it for these types."""
    from gguf_flash.kernels import dispatch
    from gguf_flash.kernels.quant_basic import q8x_scratch_bytes, round_q8
    rng = np.random.default_rng(int(qt))
    w = rng.standard_normal((8, 256)).astype(np.float32)
    rows = quantize(w, qt).view(np.uint8)
    deq = dequantize(quantize(w, qt), qt).astype(np.float64)
    x = (rng.standard_normal(256) * np.repeat(rng.random(8) * 5, 32)).astype(np.float32)
    xq = np.zeros(q8x_scratch_bytes(256), np.uint8)
    dispatch.quantize_x(xq, x)
    xr = np.zeros(256, np.float32)
    round_q8(xr, x)
    want = np.array([dispatch.dot_row(int(qt), np.ascontiguousarray(r), x, xq, dispatch.ALL_TYPES) for r in rows])
    np.testing.assert_allclose(deq @ xr.astype(np.float64), want, rtol=1e-5, atol=1e-4)
    assert np.abs(deq @ x.astype(np.float64) - want).max() > 1e-3   # float x would not be


def test_product_selection_decode_and_chunk_agree_with_numpy():
    """|act(g) u| * ||down|| > t chooses the rows, and the chosen rows carry h = act(g) u, one token at a
    time (select_by_product) and for a chunk (mask_by_product, which leaves h in HG)."""
    rng = np.random.default_rng(3)
    G = rng.standard_normal((3, 40)).astype(np.float32)
    U = rng.standard_normal((3, 40)).astype(np.float32)
    dn = rng.uniform(0.5, 2.0, 40).astype(np.float32)
    h = _np_act(G.astype(np.float64), ACT_SILU) * U
    want = np.abs(h) * dn > 0.3
    HG, MK = G.copy(), np.zeros(G.shape, np.uint8)
    sparse.mask_by_product(MK, HG, U, dn, ACT_SILU, 0.3, np.zeros(HG.shape[1], np.float32))
    np.testing.assert_array_equal(MK, want)
    np.testing.assert_allclose(HG, h, rtol=1e-5, atol=1e-6)
    for j in range(3):
        active, hv = np.zeros(40, np.int32), np.zeros(40, np.float32)
        n = sparse.select_by_product(active, hv, G[j], U[j], dn, ACT_SILU, 0.3)
        np.testing.assert_array_equal(active[:n], np.flatnonzero(want[j]))
        np.testing.assert_allclose(hv[:n], h[j, want[j]], rtol=1e-5, atol=1e-6)
