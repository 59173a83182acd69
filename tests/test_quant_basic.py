"""Kernels of gguf_flash/kernels/quant_basic.py against a numpy twin.

The twin is `gguf.quants.dequantize` (llama.cpp's own Python port of ggml-quants.c) followed by a
float64 matmul. Tolerance: |got - ref| <= 1e-4 * |w_row| * |x| (float32 accumulation in a different
order; the dequantized values themselves must match exactly).
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from gguf_flash.kernels import quant_basic as qb

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
SHAPES = [(1, 32), (3, 96), (67, 576), (5, 1536)]  # (n_rows, n_cols): odd rows, cols multiples of 32
RTOL = 1e-4


def make_w(qtype, n_rows, n_cols, rng, readonly=True, scale=1.0):
    """(n_rows, row_bytes) uint8 weights of `qtype` (the engine's convention) and their float64 values."""
    a = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    if qtype == Q.F32:
        w = a.view(np.uint8)
    else:
        w = quants.quantize(a, qtype)
    w = np.ascontiguousarray(w).view(np.uint8)  # quantize gives F16 as float16: bytes like GGUF rows
    assert w.dtype == np.uint8 and w.shape[0] == n_rows
    ref = dequant_ref(w, qtype)
    if readonly:
        w.setflags(write=False)
    return w, ref


def dequant_ref(w, qtype):
    if qtype == Q.F32:
        return w.view(np.float32).astype(np.float64)
    if qtype == Q.F16:
        return w.view(np.float16).astype(np.float64)
    return quants.dequantize(w, qtype).astype(np.float64)


def random_blocks(qtype, n_rows, n_cols, rng):
    """Uniformly random bytes in every field except the f16 scales, which get finite random values:
    exercises every nibble / high-bit pattern, not only the ones the quantizer produces."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    nb = n_cols // block
    w = rng.integers(0, 256, size=(n_rows, nb, size), dtype=np.uint8)
    n_scales = {Q.Q8_0: 1, Q.Q4_0: 1, Q.Q5_0: 1, Q.Q4_1: 2, Q.Q5_1: 2}[qtype]
    scales = (rng.standard_normal((n_rows, nb, n_scales)) * 0.05).astype(np.float16)
    w[:, :, : 2 * n_scales] = scales.view(np.uint8).reshape(n_rows, nb, 2 * n_scales)
    return np.ascontiguousarray(w.reshape(n_rows, nb * size))


def assert_close_rows(got, w_ref, x, ref):
    tol = RTOL * np.linalg.norm(w_ref, axis=-1) * np.linalg.norm(x) + 1e-30
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol):.3g}"


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_table_has_every_type():
    assert set(qb.TABLE) == {int(t) for t in TYPES}
    for fns in qb.TABLE.values():
        assert len(fns) == 5


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernels_match_numpy(qtype, shape, rng):
    n_rows, n_cols = shape
    dot, axpy, dequant_row, matvec, matmat = qb.TABLE[int(qtype)]
    w, w_ref = make_w(qtype, n_rows, n_cols, rng)
    x = rng.standard_normal(n_cols).astype(np.float32)

    # dequant_row: bit-exact against gguf.quants
    for i in range(n_rows):
        out = np.full(n_cols, np.nan, np.float32)
        dequant_row(out, w[i])
        np.testing.assert_array_equal(out, w_ref[i].astype(np.float32))

    # dot
    got = np.array([dot(w[i], x) for i in range(n_rows)])
    assert_close_rows(got, w_ref, x, w_ref @ x.astype(np.float64))

    # matvec
    out = np.full(n_rows, np.nan, np.float32)
    matvec(out, w, x)
    assert_close_rows(out, w_ref, x, w_ref @ x.astype(np.float64))

    # axpy: out += a * dequant(row), accumulated over rows (the sparse FFN's down columns)
    a = rng.standard_normal(n_rows).astype(np.float32)
    acc = rng.standard_normal(n_cols).astype(np.float32)
    ref = acc.astype(np.float64) + a.astype(np.float64) @ w_ref
    for i in range(n_rows):
        axpy(acc, a[i], w[i])
    tol = RTOL * (np.linalg.norm(a) * np.abs(w_ref).max(axis=0) * np.sqrt(n_rows) + 1.0)
    assert np.all(np.abs(acc - ref) <= tol)

    # matmat: odd and even token counts
    for n_tok in (1, 4, 7):
        X = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
        out = np.full((n_tok, n_rows), np.nan, np.float32)
        matmat(out, w, X)
        ref = X.astype(np.float64) @ w_ref.T
        for t in range(n_tok):
            assert_close_rows(out[t], w_ref, X[t], ref[t])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_every_bit_pattern(qtype, rng):
    """Random bytes (not quantizer output): every nibble and qh bit, incl. bit 31, decodes right."""
    w = random_blocks(qtype, 9, 256, rng)  # writable: the flash window's slot buffers are
    w_ref = dequant_ref(w, qtype)
    dot, axpy, dequant_row, matvec, _ = qb.TABLE[int(qtype)]
    out = np.empty(256, np.float32)
    for i in range(9):
        dequant_row(out, w[i])
        np.testing.assert_array_equal(out, w_ref[i].astype(np.float32))
    x = rng.standard_normal(256).astype(np.float32)
    assert_close_rows(np.array([dot(w[i], x) for i in range(9)]), w_ref, x, w_ref @ x.astype(np.float64))
    acc = np.zeros(256, np.float32)
    axpy(acc, 0.5, w[4])
    np.testing.assert_allclose(acc, 0.5 * w_ref[4], rtol=1e-6, atol=0)
    w.setflags(write=False)  # matvec: the read-only specialization the other tests compile already
    got = np.empty(9, np.float32)
    matvec(got, w, x)
    assert_close_rows(got, w_ref, x, w_ref @ x.astype(np.float64))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_readonly_memmap(qtype, rng, tmp_path):
    """Weights as a read-only np.memmap, like GGUFReader gives them."""
    w, w_ref = make_w(qtype, 37, 192, rng, readonly=False)
    path = tmp_path / "w.bin"
    w.tofile(path)
    wm = np.memmap(path, dtype=np.uint8, mode="r", shape=w.shape)
    dot, axpy, dequant_row, matvec, matmat = qb.TABLE[int(qtype)]
    x = rng.standard_normal(192).astype(np.float32)
    out = np.empty(37, np.float32)
    matvec(out, wm, x)
    assert_close_rows(out, w_ref, x, w_ref @ x.astype(np.float64))
    X = rng.standard_normal((3, 192)).astype(np.float32)
    outm = np.empty((3, 37), np.float32)
    matmat(outm, wm, X)
    ref = X.astype(np.float64) @ w_ref.T
    for t in range(3):
        assert_close_rows(outm[t], w_ref, X[t], ref[t])
    row = np.empty(192, np.float32)
    dequant_row(row, wm[5])
    np.testing.assert_array_equal(row, w_ref[5].astype(np.float32))
    assert abs(dot(wm[5], x) - w_ref[5] @ x) <= RTOL * np.linalg.norm(w_ref[5]) * np.linalg.norm(x)
    del wm


def test_f16_bf16_special_values():
    """inf, -inf, nan, subnormals, -0 decode exactly (F16 via F16C convert, BF16 via shift)."""
    h = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00,
                  0xC000, 0x3555] + [0] * 20, np.uint16)  # 32 values
    out = np.empty(32, np.float32)
    qb.dequant_row_f16(out, h.view(np.uint8))
    np.testing.assert_array_equal(out, h.view(np.float16).astype(np.float32))
    qb.dequant_row_bf16(out, h.view(np.uint8))
    np.testing.assert_array_equal(out, (h.astype(np.uint32) << 16).view(np.float32))


def test_large_scale_weights(rng):
    """Scales near the top of the f16 range (Q8_0 d ~ 1e4) still decode exactly."""
    w, w_ref = make_w(Q.Q8_0, 3, 64, rng, scale=1e6)
    out = np.empty(64, np.float32)
    qb.dequant_row_q8_0(out, w[1])
    np.testing.assert_array_equal(out, w_ref[1].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# decode fast path: x quantized to Q8 blocks, integer block dots (llama.cpp's vec_dot_*_q8)
# ---------------------------------------------------------------------------------------------
QUANTS = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def quantize_x_twin(x):
    """numpy twin of quantize_x_q8: (xq (n,) float64 codes, xd (nb,), xs (nb,))."""
    xb = x.reshape(-1, 32)
    xd = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(xd > 0, np.float32(1) / np.where(xd > 0, xd, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[:, None])
    return xq, xd, xd.astype(np.float64) * xq.sum(axis=1)


def block_offsets(w, qtype):
    """(n_rows, nb) float64 m of each block: value = d * code + m."""
    n_rows = w.shape[0]
    blocks = w.reshape(n_rows, -1, quants.GGML_QUANT_SIZES[qtype][1])
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype in (Q.Q4_1, Q.Q5_1):
        return blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    return {Q.Q8_0: 0.0, Q.Q4_0: -8.0, Q.Q5_0: -16.0}[qtype] * d


def q8x_twin(w, w_ref, qtype, x):
    """sum over blocks of d*xd*sum(code*xq) + m*xs, written as (value - m) . xq*xd + m*xs."""
    xq, xd, xs = quantize_x_twin(x)
    n_rows = w.shape[0]
    m = block_offsets(w, qtype)  # (n_rows, nb)
    vals = w_ref.reshape(n_rows, -1, 32)
    return np.einsum("rbj,bj->r", vals - m[..., None], xq * xd[:, None].astype(np.float64)) + m @ xs


@pytest.mark.parametrize("qtype", QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (67, 576), (3, 1536)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_q8x_matches_twin(qtype, shape, rng):
    n_rows, n_cols = shape
    w, w_ref = make_w(qtype, n_rows, n_cols, rng)
    x = rng.standard_normal(n_cols).astype(np.float32)
    x[:32] = 0  # an all-zero block: xd = 0 must give xq = 0, not nan
    scratch = np.empty(qb.q8x_scratch_bytes(n_cols), np.uint8)
    qb.quantize_x_q8(scratch, x)
    xq, xd, xs = quantize_x_twin(x)
    nb = n_cols // 32
    np.testing.assert_array_equal(scratch[:n_cols].view(np.int8), xq.reshape(-1))
    np.testing.assert_array_equal(scratch[n_cols:n_cols + 4 * nb].view(np.float32), xd)
    np.testing.assert_allclose(scratch[n_cols + 4 * nb:].view(np.float32), xs, rtol=1e-5, atol=1e-5)

    dot_q8x, matvec_q8x = qb.TABLE_Q8X[int(qtype)]
    ref = q8x_twin(w, w_ref, qtype, x)
    out = np.full(n_rows, np.nan, np.float32)
    matvec_q8x(out, w, scratch)
    assert_close_rows(out, w_ref, x, ref)
    got = np.array([dot_q8x(w[i], scratch, n_cols) for i in range(n_rows)])
    assert_close_rows(got, w_ref, x, ref)
    # it is exactly the product with x's 8-bit rounding (llama.cpp's scheme) ...
    xq_deq = (xq * xd[:, None].astype(np.float64)).reshape(-1)
    assert_close_rows(out, w_ref, x, w_ref @ xq_deq)
    # ... so an approximation of the exact product, well under 2% of |w||x|
    exact = w_ref @ x.astype(np.float64)
    assert np.all(np.abs(out - exact) <= 0.02 * np.linalg.norm(w_ref, axis=1) * np.linalg.norm(x))


@pytest.mark.parametrize("qtype", QUANTS, ids=lambda t: t.name)
def test_q8x_every_bit_pattern(qtype, rng):
    w = random_blocks(qtype, 9, 256, rng)
    w_ref = dequant_ref(w, qtype)
    w.setflags(write=False)
    x = rng.standard_normal(256).astype(np.float32)
    scratch = np.empty(qb.q8x_scratch_bytes(256), np.uint8)
    qb.quantize_x_q8(scratch, x)
    out = np.empty(9, np.float32)
    qb.TABLE_Q8X[int(qtype)][1](out, w, scratch)
    assert_close_rows(out, w_ref, x, q8x_twin(w, w_ref, qtype, x))
