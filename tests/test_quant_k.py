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
