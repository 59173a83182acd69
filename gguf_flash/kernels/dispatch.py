"""Dispatch from a ggml type id to its kernels, inside numba code.

The forward pass is one compiled function per token, so the per-matrix choice of kernel happens here:
one comparison chain per matrix call (not per row or block); the inner loops are the per-type kernels
of quant_basic.py and quant_k.py. A weight is addressed as (offset, n_rows, row_bytes, qtype) into the
memory-mapped file `blob` (file_size,) uint8, so one compiled forward serves every mix of types.
"""

import numpy as np
from numba import njit

from . import quant_basic as qb
from . import quant_k as qk

# ggml type ids (gguf.GGMLQuantizationType)
F32 = 0
F16 = 1
BF16 = 30
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
IQ4_NL = 20
SUPPORTED = (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL)


@njit(cache=True, inline="always")
def weight(blob, m):
    """(n_rows, row_bytes) uint8 view of the weight described by m = (offset, n_rows, row_bytes, qtype)."""
    return blob[m[0]:m[0] + m[1] * m[2]].reshape((m[1], m[2]))


@njit(cache=True)
def quantize_x(xq, x):
    """xq (q8x_scratch_bytes(n),) uint8 <- x (n,) as 8-bit blocks, once per input vector: the
    Q4/Q5/Q8 matvecs then use integer dot products (llama.cpp's scheme, ~2x the float path)."""
    qb.quantize_x_q8(xq, x)


@njit(cache=True, inline="always")
def uses_q8x(qt):
    """True for the types whose decode matvec/dot reads the input as 8-bit blocks (quantize_x)."""
    return qt == Q4_0 or qt == Q4_1 or qt == Q5_0 or qt == Q5_1 or qt == Q8_0


@njit(cache=True)
def matvec(out, blob, m, x, xq):
    """out (n_rows,) = W @ x; xq is x after quantize_x (used by the Q4/Q5/Q8 types)."""
    w = weight(blob, m)
    qt = m[3]
    if qt == Q4_1:
        qb.matvec_q8x_q4_1(out, w, xq)
    elif qt == Q8_0:
        qb.matvec_q8x_q8_0(out, w, xq)
    elif qt == Q4_0:
        qb.matvec_q8x_q4_0(out, w, xq)
    elif qt == Q5_0:
        qb.matvec_q8x_q5_0(out, w, xq)
    elif qt == Q5_1:
        qb.matvec_q8x_q5_1(out, w, xq)
    elif qt == F32:
        qb.matvec_f32(out, w, x)
    elif qt == F16:
        qb.matvec_f16(out, w, x)
    elif qt == BF16:
        qb.matvec_bf16(out, w, x)
    elif qt == Q2_K:
        qk.matvec_q2_k(out, w, x)
    elif qt == Q3_K:
        qk.matvec_q3_k(out, w, x)
    elif qt == Q4_K:
        qk.matvec_q4_k(out, w, x)
    elif qt == Q5_K:
        qk.matvec_q5_k(out, w, x)
    elif qt == Q6_K:
        qk.matvec_q6_k(out, w, x)
    elif qt == IQ4_NL:
        qk.matvec_iq4_nl(out, w, x)
    else:
        raise ValueError("unsupported ggml type")


@njit(cache=True)
def matmat(out, blob, m, x):
    """out (n_tok, n_rows) = X @ W.T for X (n_tok, n_cols)."""
    w = weight(blob, m)
    qt = m[3]
    if qt == F32:
        qb.matmat_f32(out, w, x)
    elif qt == F16:
        qb.matmat_f16(out, w, x)
    elif qt == BF16:
        qb.matmat_bf16(out, w, x)
    elif qt == Q4_0:
        qb.matmat_q4_0(out, w, x)
    elif qt == Q4_1:
        qb.matmat_q4_1(out, w, x)
    elif qt == Q5_0:
        qb.matmat_q5_0(out, w, x)
    elif qt == Q5_1:
        qb.matmat_q5_1(out, w, x)
    elif qt == Q8_0:
        qb.matmat_q8_0(out, w, x)
    elif qt == Q2_K:
        qk.matmat_q2_k(out, w, x)
    elif qt == Q3_K:
        qk.matmat_q3_k(out, w, x)
    elif qt == Q4_K:
        qk.matmat_q4_k(out, w, x)
    elif qt == Q5_K:
        qk.matmat_q5_k(out, w, x)
    elif qt == Q6_K:
        qk.matmat_q6_k(out, w, x)
    elif qt == IQ4_NL:
        qk.matmat_iq4_nl(out, w, x)
    else:
        raise ValueError("unsupported ggml type")


@njit(cache=True)
def dequant_row(out, blob, m, r):
    """out (n_cols,) = row r of the weight, dequantized (embedding lookup)."""
    w = weight(blob, m)
    qt = m[3]
    if qt == F32:
        qb.dequant_row_f32(out, w[r])
    elif qt == F16:
        qb.dequant_row_f16(out, w[r])
    elif qt == BF16:
        qb.dequant_row_bf16(out, w[r])
    elif qt == Q4_0:
        qb.dequant_row_q4_0(out, w[r])
    elif qt == Q4_1:
        qb.dequant_row_q4_1(out, w[r])
    elif qt == Q5_0:
        qb.dequant_row_q5_0(out, w[r])
    elif qt == Q5_1:
        qb.dequant_row_q5_1(out, w[r])
    elif qt == Q8_0:
        qb.dequant_row_q8_0(out, w[r])
    elif qt == Q2_K:
        qk.dequant_row_q2_k(out, w[r])
    elif qt == Q3_K:
        qk.dequant_row_q3_k(out, w[r])
    elif qt == Q4_K:
        qk.dequant_row_q4_k(out, w[r])
    elif qt == Q5_K:
        qk.dequant_row_q5_k(out, w[r])
    elif qt == Q6_K:
        qk.dequant_row_q6_k(out, w[r])
    elif qt == IQ4_NL:
        qk.dequant_row_iq4_nl(out, w[r])
    else:
        raise ValueError("unsupported ggml type")


# ---- one row at a time (the sparse FFN over bundle slots) ----------------------------------------
# The sparse FFN visits a few hundred rows per layer and token, each a dot of n_embd values; the type
# test below costs a few compares per row, against hundreds of multiply-adds. (numba cannot cache a
# kernel that takes the per-type functions as arguments, which would be the table-driven version.)
# The 8-bit types call their LLVM-IR intrinsics (quant_basic._dq8x_*, _axpy_*) directly, inlined here:
# through their @njit wrappers each row paid a call with array arguments, 1.4x the whole dot
# (SmolLM2's Q4_1 gate rows: 144 -> 106 us for 1536 rows, one thread, the same values).
# No raise here: an exception path inside a prange body stops numba from parallelizing the loop, so
# the types are checked once when a flash file is opened (runtime.FlashModel).

@njit(cache=True, inline="always")
def dot_row(qt, row, x, xq):
    """row (row_bytes,) uint8 . x (n,) f32; xq is x after quantize_x (Q4/Q5/Q8 use it)."""
    if qt == F32:
        return qb.dot_f32(row, x)
    elif qt == F16:
        return qb.dot_f16(row, x)
    elif qt == BF16:
        return qb.dot_bf16(row, x)
    elif qt == Q4_0:
        return qb._dq8x_q4_0(row, xq, x.shape[0])
    elif qt == Q4_1:
        return qb._dq8x_q4_1(row, xq, x.shape[0])
    elif qt == Q5_0:
        return qb._dq8x_q5_0(row, xq, x.shape[0])
    elif qt == Q5_1:
        return qb._dq8x_q5_1(row, xq, x.shape[0])
    elif qt == Q8_0:
        return qb._dq8x_q8_0(row, xq, x.shape[0])
    elif qt == Q2_K:
        return qk.dot_q2_k(row, x)
    elif qt == Q3_K:
        return qk.dot_q3_k(row, x)
    elif qt == Q4_K:
        return qk.dot_q4_k(row, x)
    elif qt == Q5_K:
        return qk.dot_q5_k(row, x)
    elif qt == Q6_K:
        return qk.dot_q6_k(row, x)
    elif qt == IQ4_NL:
        return qk.dot_iq4_nl(row, x)
    return np.float32(0.0)  # unreachable: FlashModel refuses types outside SUPPORTED at open


@njit(cache=True, inline="always")
def axpy_row(qt, out, a, row):
    """out (n,) += a * dequant(row)."""
    if qt == F32:
        qb.axpy_f32(out, a, row)
    elif qt == F16:
        qb.axpy_f16(out, a, row)
    elif qt == BF16:
        qb.axpy_bf16(out, a, row)
    elif qt == Q4_0:
        qb._axpy_q4_0(out, np.float32(a), row)
    elif qt == Q4_1:
        qb._axpy_q4_1(out, np.float32(a), row)
    elif qt == Q5_0:
        qb._axpy_q5_0(out, np.float32(a), row)
    elif qt == Q5_1:
        qb._axpy_q5_1(out, np.float32(a), row)
    elif qt == Q8_0:
        qb._axpy_q8_0(out, np.float32(a), row)
    elif qt == Q2_K:
        qk.axpy_q2_k(out, a, row)
    elif qt == Q3_K:
        qk.axpy_q3_k(out, a, row)
    elif qt == Q4_K:
        qk.axpy_q4_k(out, a, row)
    elif qt == Q5_K:
        qk.axpy_q5_k(out, a, row)
    elif qt == Q6_K:
        qk.axpy_q6_k(out, a, row)
    elif qt == IQ4_NL:
        qk.axpy_iq4_nl(out, a, row)


@njit(cache=True)
def dequant_into(qt, out, row):
    """out (n,) f32 = dequant(row): one bundle part decoded once and used by a whole prompt chunk.
    Not inlined: the prompt kernels call it from several places, and every inlined copy of the 14
    type kernels is machine code resident under the cap."""
    if qt == F32:
        qb.dequant_row_f32(out, row)
    elif qt == F16:
        qb.dequant_row_f16(out, row)
    elif qt == BF16:
        qb.dequant_row_bf16(out, row)
    elif qt == Q4_0:
        qb.dequant_row_q4_0(out, row)
    elif qt == Q4_1:
        qb.dequant_row_q4_1(out, row)
    elif qt == Q5_0:
        qb.dequant_row_q5_0(out, row)
    elif qt == Q5_1:
        qb.dequant_row_q5_1(out, row)
    elif qt == Q8_0:
        qb.dequant_row_q8_0(out, row)
    elif qt == Q2_K:
        qk.dequant_row_q2_k(out, row)
    elif qt == Q3_K:
        qk.dequant_row_q3_k(out, row)
    elif qt == Q4_K:
        qk.dequant_row_q4_k(out, row)
    elif qt == Q5_K:
        qk.dequant_row_q5_k(out, row)
    elif qt == Q6_K:
        qk.dequant_row_q6_k(out, row)
    elif qt == IQ4_NL:
        qk.dequant_row_iq4_nl(out, row)
