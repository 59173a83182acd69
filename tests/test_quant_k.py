"""K-quant and IQ4_NL kernels (gguf_flash/kernels/quant_k.py) against gguf.quants.dequantize.

Random bytes are valid blocks for these types except the f16 scales, which are overwritten with sane
finite values; the numpy twin is gguf.quants.dequantize followed by a float64 matmul.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from gguf_flash.kernels import quant_k

# byte offsets of the f16 fields (d, dmin) inside one block (ggml-common.h)
F16_OFFSETS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
               T.IQ4_NL: (0,)}
TYPES = list(F16_OFFSETS)
SHAPES = [(n_rows, n_cols) for n_rows in (1, 3, 67) for n_cols in (256, 512, 2048)]
RTOL = 1e-4
GEMMA = Path(os.path.expanduser("~/.cache/gguf-flash/models/gemma-3-270m-q4_k_m.gguf"))


def random_blocks(qtype, n_rows, n_cols, rng):
    """(n_rows, row_bytes) uint8 of random blocks with finite f16 scales, read-only like a memmap."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = n_cols // block_size
    w = rng.integers(0, 256, (n_rows, n_blocks, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scale = (rng.standard_normal((n_rows, n_blocks, 1)) * 0.02).astype(np.float16)
        w[:, :, off:off + 2] = scale.view(np.uint8)
    w = w.reshape(n_rows, n_blocks * type_size)
    w.setflags(write=False)
    return w


def readonly(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def check_close(got, want, scale):
    err = np.abs(np.asarray(got, np.float64) - want).max()
    assert err <= RTOL * scale, (err, scale)


def test_layout_sizes_match_gguf():
    sizes = {T.Q2_K: quant_k.Q2_K_BYTES, T.Q3_K: quant_k.Q3_K_BYTES, T.Q4_K: quant_k.Q4_K_BYTES,
             T.Q5_K: quant_k.Q5_K_BYTES, T.Q6_K: quant_k.Q6_K_BYTES, T.IQ4_NL: quant_k.IQ4_NL_BYTES}
    for qtype, n_bytes in sizes.items():
        assert GGML_QUANT_SIZES[qtype][1] == n_bytes
    assert set(quant_k.TABLE) == {int(t) for t in TYPES}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_gguf_dequantize(qtype, shape):
    n_rows, n_cols = shape
    rng = np.random.default_rng(1000 * n_rows + n_cols + int(qtype))
    w = random_blocks(qtype, n_rows, n_cols, rng)  # (n_rows, row_bytes) uint8, read-only
    ref = quants.dequantize(w, qtype).astype(np.float64)  # (n_rows, n_cols)
    x = readonly(rng.standard_normal(n_cols).astype(np.float32))  # (n_cols,)
    dot, axpy, dequant_row, matvec, matmat = quant_k.TABLE[int(qtype)]
    row_norm = np.linalg.norm(ref, axis=1).max()

    # dequant_row: the same numbers gguf gives (float32 rounding only)
    out = np.empty(n_cols, np.float32)
    for r in range(n_rows):
        dequant_row(out, w[r])
        check_close(out, ref[r], np.abs(ref[r]).max())

    # dot and matvec
    want = ref @ x.astype(np.float64)  # (n_rows,)
    scale = row_norm * np.linalg.norm(x)
    for r in range(n_rows):
        check_close(dot(w[r], x), want[r], scale)
    y = np.full(n_rows, np.nan, np.float32)
    matvec(y, w, x)
    check_close(y, want, scale)

    # axpy accumulates into what is already there
    base = rng.standard_normal(n_cols).astype(np.float32)
    out = base.copy()
    a = np.float32(-0.75)
    axpy(out, a, w[n_rows - 1])
    check_close(out, base + float(a) * ref[n_rows - 1], np.abs(ref[n_rows - 1]).max())

    # matmat: odd and even token counts (the kernel pairs tokens)
    for n_tok in (1, 2, 5):
        X = readonly(rng.standard_normal((n_tok, n_cols)).astype(np.float32))  # (n_tok, n_cols)
        Y = np.full((n_tok, n_rows), np.nan, np.float32)
        matmat(Y, w, X)
        check_close(Y, X.astype(np.float64) @ ref.T, row_norm * np.linalg.norm(X, axis=1).max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes(qtype):
    """All-zero and all-0xFF payloads hit the ends of every bit field (and of the IQ4_NL codebook)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_cols = 2 * max(block_size, 256)
    for fill in (0x00, 0xFF, 0x5A):
        w = np.full((2, n_cols // block_size, type_size), fill, np.uint8)
        for off in F16_OFFSETS[qtype]:
            w[:, :, off:off + 2] = np.array([0.5], np.float16).view(np.uint8)
        w = readonly(w.reshape(2, -1))
        ref = quants.dequantize(w, qtype).astype(np.float64)
        out = np.empty(n_cols, np.float32)
        quant_k.TABLE[int(qtype)][2](out, w[1])
        check_close(out, ref[1], np.abs(ref[1]).max() + 1.0)


@pytest.fixture(scope="module")
def gemma_reader():
    if not GEMMA.exists():
        pytest.skip(f"real model not on disk: {GEMMA}")
    from gguf import GGUFReader
    return GGUFReader(str(GEMMA))


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight",
                                  "blk.0.attn_output.weight"])
def test_real_gemma_tensor(gemma_reader, name):
    tensor = next(t for t in gemma_reader.tensors if t.name == name)
    w = tensor.data  # (n_rows, row_bytes) uint8, read-only memmap view
    assert w.dtype == np.uint8 and not w.flags.writeable
    qtype = tensor.tensor_type
    assert qtype in (T.Q4_K, T.Q6_K)
    ref = quants.dequantize(w, qtype).astype(np.float64)  # (n_rows, n_cols)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(ref.shape[1]).astype(np.float32)
    dot, _, _, matvec, _ = quant_k.TABLE[int(qtype)]
    want = ref @ x.astype(np.float64)
    scale = np.linalg.norm(ref, axis=1).max() * np.linalg.norm(x)
    for r in (0, 1, ref.shape[0] // 2, ref.shape[0] - 1):
        check_close(dot(w[r], x), want[r], scale)
    y = np.empty(ref.shape[0], np.float32)
    matvec(y, w, x)
    check_close(y, want, scale)


# ---------------------------------------------------------------------------------------------
# decode dots on 8-bit input blocks (quant_kq8.py): exactly dequant(row) . (xq * xd)
# ---------------------------------------------------------------------------------------------
Q8X_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
_KIND = {T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k"}


def quantized_x(x):
    """(scratch from quantize_x_q8, x as those blocks round it (float64))."""
    from gguf_flash.kernels import quant_basic
    scratch = np.empty(quant_basic.q8x_scratch_bytes(x.shape[0]), np.uint8)
    quant_basic.quantize_x_q8(scratch, x)
    n, nb = x.shape[0], x.shape[0] // 32
    xq = scratch[:n].view(np.int8).astype(np.float64).reshape(nb, 32)
    xd = scratch[n:n + 4 * nb].view(np.float32).astype(np.float64)
    return scratch, (xq * xd[:, None]).reshape(-1)


def _generic_dot(qtype):
    """The generic-IR build of the dot (what a CPU without AVX2 runs), compiled here."""
    from numba import njit
    from gguf_flash.kernels import quant_kq8
    kernel = quant_kq8._make_dot_q8x(_KIND[qtype], avx2=False)

    @njit
    def dot(row, scratch, n_cols):
        return kernel(row, scratch, n_cols)

    return dot


@pytest.mark.parametrize("qtype", Q8X_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256), (67, 512), (3, 2048)], ids=str)
def test_q8x_dot_is_the_product_with_rounded_x(qtype, shape):
    from gguf_flash.kernels import quant_kq8
    n_rows, n_cols = shape
    rng = np.random.default_rng(50 + n_rows + int(qtype))
    w = random_blocks(qtype, n_rows, n_cols, rng)
    ref = quants.dequantize(w, qtype).astype(np.float64)
    x = rng.standard_normal(n_cols).astype(np.float32)
    x[32:64] = 0  # an all-zero block: its scale is 0
    scratch, xr = quantized_x(x)
    want = ref @ xr
    scale = np.linalg.norm(ref, axis=1).max() * np.linalg.norm(x)
    dot, matvec = quant_kq8.TABLE_Q8X[int(qtype)]
    y = np.full(n_rows, np.nan, np.float32)
    matvec(y, w, scratch)
    check_close(y, want, scale)
    check_close([dot(w[r], scratch, n_cols) for r in range(n_rows)], want, scale)
    generic = _generic_dot(qtype)
    check_close([generic(w[r], scratch, n_cols) for r in range(n_rows)], want, scale)
    # ... so an approximation of the exact product, well under 2% of |w||x| (x's 8-bit rounding)
    assert np.all(np.abs(y - ref @ x.astype(np.float64)) <= 0.02 * scale)


@pytest.mark.parametrize("qtype", Q8X_TYPES, ids=lambda t: t.name)
def test_q8x_dot_extreme_codes(qtype):
    """All-zero and all-0xFF payloads: the ends of every bit field, of the 4- and 6-bit scales and mins,
    and the largest 16-bit pair sums (63 * 127 * 2 for Q6_K) against x at +-127 per block."""
    from gguf_flash.kernels import quant_kq8
    _, type_size = GGML_QUANT_SIZES[qtype]
    n_cols = 512
    for fill in (0x00, 0xFF, 0x5A, 0xA5):
        w = np.full((2, n_cols // 256, type_size), fill, np.uint8)
        for off in F16_OFFSETS[qtype]:
            w[:, :, off:off + 2] = np.array([0.5], np.float16).view(np.uint8)
        w = readonly(w.reshape(2, -1))
        ref = quants.dequantize(w, qtype).astype(np.float64)
        for x in (np.ones(n_cols, np.float32), -np.ones(n_cols, np.float32),
                  np.tile(np.float32([1, -1]), n_cols // 2)):
            scratch, xr = quantized_x(x)
            y = np.empty(2, np.float32)
            quant_kq8.TABLE_Q8X[int(qtype)][1](y, w, scratch)
            check_close(y, ref @ xr, np.abs(ref).sum())
            check_close([_generic_dot(qtype)(w[1], scratch, n_cols)], (ref @ xr)[1:], np.abs(ref).sum())


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight",
                                  "blk.0.attn_output.weight"])
def test_q8x_real_gemma_tensor(gemma_reader, name):
    from gguf_flash.kernels import quant_kq8
    tensor = next(t for t in gemma_reader.tensors if t.name == name)
    w, qtype = tensor.data, tensor.tensor_type
    ref = quants.dequantize(w, qtype).astype(np.float64)
    x = np.random.default_rng(8).standard_normal(ref.shape[1]).astype(np.float32)
    scratch, xr = quantized_x(x)
    y = np.empty(ref.shape[0], np.float32)
    quant_kq8.TABLE_Q8X[int(qtype)][1](y, w, scratch)
    check_close(y, ref @ xr, np.linalg.norm(ref, axis=1).max() * np.linalg.norm(x))
