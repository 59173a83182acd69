"""Numba kernels for the basic ggml tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Every kernel works on the quantized blocks where they lie (the memory-mapped GGUF rows); no
kernel dequantizes a whole matrix into a copy.

Weight convention (the whole engine uses it): a weight matrix is a zero-copy uint8 array
`w` (n_rows, row_bytes) -- what `gguf.GGUFReader(...).tensors[i].data` gives for quant types; float
tensors are passed as `.view(np.uint8)` of their rows (F32 row_bytes = 4*n_cols, F16/BF16 = 2*n_cols).
Vectors are float32. Weights may be read-only (np.memmap): numba compiles a readonly specialization.

Per type T (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1):
    dot_T(row, x) -> float32          row (row_bytes,) uint8 . x (n_cols,) float32
    axpy_T(out, a, row)               out (n_cols,) float32 += a * dequant(row)
    dequant_row_T(out, row)           out (n_cols,) float32 = dequant(row)
    matvec_T(out, w, x)               out (n_rows,) float32 = W @ x        (prange over rows)
    matmat_T(out, w, X)               out (n_tok, n_rows) float32 = X @ W.T (prange over row groups)
TABLE maps int(GGMLQuantizationType) -> (dot, axpy, dequant_row, matvec, matmat).

Decode fast path for the quant types (llama.cpp's scheme, ~2x the float matvec; x rounded to 8 bits):
    quantize_x_q8(scratch, x)         scratch (q8x_scratch_bytes(n_cols),) uint8, preallocated
    dot_q8x_T(row, scratch, n_cols) -> float32
    matvec_q8x_T(out, w, scratch)     out (n_rows,) float32 ~= W @ x
TABLE_Q8X maps int(GGMLQuantizationType) -> (dot_q8x, matvec_q8x) for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Block layouts (ggml-common.h; checked against gguf.quants.dequantize in tests/test_quant_basic.py).
QK = 32 elements per block; d, m are little-endian f16; j in 0..15:
    Q8_0  (34 B): d | qs[32] int8                      x[j] = d * qs[j]
    Q4_0  (18 B): d | qs[16]                           x[j] = d * ((qs[j] & 15) - 8)
                                                       x[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1  (20 B): d | m | qs[16]                       x[j] = d * (qs[j] & 15) + m,  x[j+16] likewise >> 4
    Q5_0  (22 B): d | qh (u32) | qs[16]                x[j] = d * (((qs[j] & 15) | bit_j(qh) << 4) - 16)
                                                       x[j+16] = d * (((qs[j] >> 4) | bit_{j+16}(qh) << 4) - 16)
    Q5_1  (24 B): d | m | qh (u32) | qs[16]            as Q5_0 without the -16, plus m
    BF16: the upper 16 bits of an f32.

Speed notes. Decode is memory-bound (each weight byte is read once per token). F32/F16/BF16 are
plain loops LLVM vectorizes (F16 via F16C's vcvtph2ps through a tiny intrinsic, not a Python
lookup). The quant blocks are decoded in hand-written LLVM vector IR (see that section's banner for
why): integer codes -> <32 x float>, FMA with x, and the block's sum(x) folded in so the offset m
(Q4_1/Q5_1) or the -8/-16 bias (Q4_0/Q5_0) costs one multiply per block. matmat dequantizes 16 rows
into a scratch block once and reuses it for every token of the prompt (2 tokens x 4 rows blocking).
Cold start: compiling every kernel takes ~40 s of CPU; numba's on-disk cache makes later runs ~1 s.
"""
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# No nnan/ninf: -inf masks elsewhere in the engine must survive (STYLE.md, pynndescent habit).
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}

QK = 32  # elements per block of every type here
# bytes per block: (QK, sizes written as the layout)
Q8_0_BYTES = 2 + QK  # d, qs
Q4_0_BYTES = 2 + QK // 2  # d, qs
Q4_1_BYTES = 2 + 2 + QK // 2  # d, m, qs
Q5_0_BYTES = 2 + 4 + QK // 2  # d, qh, qs
Q5_1_BYTES = 2 + 2 + 4 + QK // 2  # d, m, qh, qs

# rows decoded together by matmat: scratch (MM_ROWS, n_cols) float32 stays in L1/L2
MM_ROWS = 16


# ---------------------------------------------------------------------------------------------
# scalar helpers: half/bf16 decode through LLVM casts (vectorizable, F16C's vcvtph2ps on AVX2)
# ---------------------------------------------------------------------------------------------
@intrinsic
def _u16_as_f16_to_f32(typingctx, h):
    """float32 value of the IEEE half whose bits are the uint16 `h` (exact, incl. inf/nan/subnormal)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _u32_as_f32(typingctx, u):
    """float32 whose bits are the uint32 `u` (bf16 decode: bits << 16)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def prefetch(typingctx, row, off):
    """Ask the CPU to bring the cache line of row[off] (row (n,) uint8 C-contiguous) into cache, without
    waiting (llvm.prefetch: read, into L2). Used where rows are visited in an order the hardware
    prefetcher cannot guess (window slots)."""
    sig = types.void(row, off)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # locality 2 (x86 prefetcht1: to L2, not L1): the bundle FFN over rows held in RAM ran at 1.33-1.35x
        # the dense FFN's time, against 1.35-1.54x with prefetcht0 (SmolLM2, 30 layers, 2 threads,
        # alternating runs); the dense matvecs the same either way
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# Rows PF_ROWS ahead are asked for while row i is computed: a decode token streams every weight once,
# in 0.1-3 MB matrices, and the hardware prefetcher alone lost the start of each matrix's streams (one
# per thread) and fell behind within them. SmolLM2 dense decode 12.5 -> 5.3-5.5 ms per token, Gemma 3
# 29 -> 18.4-19.4 ms (2 threads, AVX-512 Xeon, alternating runs); 16 rows ahead was no better.
PF_ROWS = 8


@njit(inline="always")
def prefetch_ahead(w, i):
    """Prefetch every cache line of row i + PF_ROWS of w (n_rows, row_bytes) uint8, if there is one."""
    j = i + PF_ROWS
    if j < w.shape[0]:
        r = w[j]
        for off in range(0, r.shape[0], 64):
            prefetch(r, off)


if numba.config.DISABLE_JIT:  # plain-Python twins so the suite can run with NUMBA_DISABLE_JIT=1
    def _u16_as_f16_to_f32(h):  # noqa: F811
        return np.float32(np.uint16(h).view(np.float16))

    def prefetch(row, off):  # noqa: F811
        pass

    def _u32_as_f32(u):  # noqa: F811
        return np.uint32(u).view(np.float32)


@njit(inline="always")
def _bf16_to_f32(h):
    return _u32_as_f32(np.uint32(h) << np.uint32(16))


# ---------------------------------------------------------------------------------------------
# matmat core: out[t, r0 + r] = buf[r] . X[t] for r < nr, every t. Register-blocked 2 tokens x 4
# rows: each pass over k loads 2 x-vectors and 4 buf-vectors for 8 FMAs.
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def _gemm_rows(out, buf, X, r0, nr):
    # out (n_tok, n_rows) f32; buf (MM_ROWS, n_cols) f32 (first nr rows valid); X (n_tok, n_cols) f32
    n_tok, n = X.shape
    t = 0
    while t + 2 <= n_tok:
        x0 = X[t]
        x1 = X[t + 1]
        r = 0
        while r + 4 <= nr:
            b0 = buf[r]
            b1 = buf[r + 1]
            b2 = buf[r + 2]
            b3 = buf[r + 3]
            a00 = np.float32(0); a01 = np.float32(0); a02 = np.float32(0); a03 = np.float32(0)
            a10 = np.float32(0); a11 = np.float32(0); a12 = np.float32(0); a13 = np.float32(0)
            for k in range(n):
                u = x0[k]
                v = x1[k]
                a00 += u * b0[k]; a01 += u * b1[k]; a02 += u * b2[k]; a03 += u * b3[k]
                a10 += v * b0[k]; a11 += v * b1[k]; a12 += v * b2[k]; a13 += v * b3[k]
            out[t, r0 + r] = a00; out[t, r0 + r + 1] = a01; out[t, r0 + r + 2] = a02; out[t, r0 + r + 3] = a03
            out[t + 1, r0 + r] = a10; out[t + 1, r0 + r + 1] = a11
            out[t + 1, r0 + r + 2] = a12; out[t + 1, r0 + r + 3] = a13
            r += 4
        while r < nr:
            b0 = buf[r]
            a0 = np.float32(0); a1 = np.float32(0)
            for k in range(n):
                a0 += x0[k] * b0[k]
                a1 += x1[k] * b0[k]
            out[t, r0 + r] = a0; out[t + 1, r0 + r] = a1
            r += 1
        t += 2
    if t < n_tok:  # odd token count: last token alone
        x0 = X[t]
        for r in range(nr):
            b0 = buf[r]
            a0 = np.float32(0)
            for k in range(n):
                a0 += x0[k] * b0[k]
            out[t, r0 + r] = a0


# ---------------------------------------------------------------------------------------------
# F32: row (4*n_cols,) uint8 = n_cols little-endian float32
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_f32(row, x):
    w = row.view(np.float32)  # (n_cols,) f32, zero-copy
    s = np.float32(0)
    for i in range(x.shape[0]):
        s += w[i] * x[i]
    return s


@njit(cache=True, fastmath=FASTMATH)
def axpy_f32(out, a, row):
    w = row.view(np.float32)
    a = np.float32(a)
    for i in range(out.shape[0]):
        out[i] += a * w[i]


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_f32(out, row):
    w = row.view(np.float32)
    for i in range(out.shape[0]):
        out[i] = w[i]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_f32(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_f32(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_f32(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_f32(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# F16: row (2*n_cols,) uint8 = n_cols little-endian IEEE half
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_f16(row, x):
    h = row.view(np.uint16)  # (n_cols,) raw half bits
    s = np.float32(0)
    for i in range(x.shape[0]):
        s += _u16_as_f16_to_f32(h[i]) * x[i]
    return s


@njit(cache=True, fastmath=FASTMATH)
def axpy_f16(out, a, row):
    h = row.view(np.uint16)
    a = np.float32(a)
    for i in range(out.shape[0]):
        out[i] += a * _u16_as_f16_to_f32(h[i])


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_f16(out, row):
    h = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = _u16_as_f16_to_f32(h[i])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_f16(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_f16(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_f16(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)
        for r in range(nr):
            dequant_row_f16(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# BF16: row (2*n_cols,) uint8 = n_cols bfloat16 (upper halves of f32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_bf16(row, x):
    h = row.view(np.uint16)
    s = np.float32(0)
    for i in range(x.shape[0]):
        s += _bf16_to_f32(h[i]) * x[i]
    return s


@njit(cache=True, fastmath=FASTMATH)
def axpy_bf16(out, a, row):
    h = row.view(np.uint16)
    a = np.float32(a)
    for i in range(out.shape[0]):
        out[i] += a * _bf16_to_f32(h[i])


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_bf16(out, row):
    h = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = _bf16_to_f32(h[i])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_bf16(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_bf16(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_bf16(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)
        for r in range(nr):
            dequant_row_bf16(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Quantized blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in hand-written LLVM vector IR.
# Why: numba's loops over a 16-byte block get fully unrolled and then vectorized across blocks
# with per-lane inserts (measured 1.2 GB/s for Q4_1 matvec); the same arithmetic written as
# <32 x i8> -> <32 x float> vectors runs 7.6 GB/s (tools/bench_kernels.py). Each block's 32 codes
# become one <32 x float> (4 AVX2 registers); per block the kernels do
#   dot:      acc_d += d * sum_k(codes_k * x_k) ; acc_m += m * sum(x)   (8-lane accumulators)
#   axpy:     out += (a*d) * codes + a*m
#   dequant:  out = d * codes + m
# with m = the Q4_1/Q5_1 offset, -8d for Q4_0, -16d for Q5_0, 0 for Q8_0 (ggml-common.h layouts).
# Works on any x86/ARM target LLVM knows (generic vector IR, no x86-only intrinsics).
# ---------------------------------------------------------------------------------------------
_FMF = ("contract", "reassoc", "nsz", "arcp", "afn")  # same flags as FASTMATH, on our own IR
_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)

# kind -> (block bytes, offset of d, offset of m or None, offset of qh or None, offset of qs, bias)
_LAYOUT = {
    "q8_0": (Q8_0_BYTES, 0, None, None, 2, 0.0),
    "q4_0": (Q4_0_BYTES, 0, None, None, 2, -8.0),
    "q4_1": (Q4_1_BYTES, 0, 2, None, 4, 0.0),
    "q5_0": (Q5_0_BYTES, 0, None, 2, 6, -16.0),
    "q5_1": (Q5_1_BYTES, 0, 2, 4, 8, 0.0),
}
_GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
              "q5_1": GGMLQuantizationType.Q5_1}


def _vec(t, n):
    return ir.VectorType(t, n)


def _vconst(t, vals):
    vals = list(vals)
    return ir.Constant(_vec(t, len(vals)), vals)


def _splat(b, val, n):
    undef = ir.Constant(_vec(val.type, n), ir.Undefined)
    v = b.insert_element(undef, val, ir.Constant(_I32, 0))
    return b.shuffle_vector(v, undef, _vconst(_I32, [0] * n))


def _load(b, base, off, ty, align=1):
    """load a `ty` at byte/element offset `off` (i64) of pointer `base`."""
    return b.load(b.bitcast(b.gep(base, [off]), ir.PointerType(ty)), align=align)


def _arg_ptr(context, b, sig, args, k, ty):
    """The data pointer of array argument k of an intrinsic, as a `ty` pointer."""
    return b.bitcast(context.make_array(sig.args[k])(context, b, args[k]).data, ir.PointerType(ty))


def _out_f32(context, b, sig, args, shift):
    """(float32 pointer, length >> shift) of an intrinsic's first argument, the float32 output vector
    (shift 5: its 32-value blocks; 4: its 16-lane vectors)."""
    oa = context.make_array(sig.args[0])(context, b, args[0])
    return b.bitcast(oa.data, ir.PointerType(_F32)), b.lshr(b.extract_value(oa.shape, 0), ir.Constant(_I64, shift))


def _store(b, val, base, off):
    b.store(val, b.bitcast(b.gep(base, [off]), ir.PointerType(val.type)), align=4)


# The axpy's vectors: 16 floats. With 8, LLVM still converted each block's codes in two 512-bit halves on
# AVX-512 and then split them for the 256-bit multiply-adds, loads and stores (an extract each); a Q8_0
# row of 576 took 36-37 ns, 29-31 with 16 (one thread, in cache, the output on a cache line). AVX2 and
# NEON split the 16 into two or four registers, as they split the 8 before. A block is two such halves
# (_block_code_halves for the 4- and 5-bit kinds).
AXPY_LANES = 16


def _part(b, v, k, w=8):
    """lanes w k .. w k + w - 1 of a vector (w=8 of a <32 x float>: one AVX2 register, free)."""
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), _vconst(_I32, range(w * k, w * k + w)))


def _hsum8(b, v):
    for w in (4, 2, 1):
        hi = b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                              _vconst(_I32, [(i + w) if i < w else 0 for i in range(8)]))
        v = b.fadd(v, hi, flags=_FMF)
    return b.extract_element(v, ir.Constant(_I32, 0))


def _block_codes(b, bp, kind):
    """<32 x float> integer codes of the block at i8* bp (element j+16 = high nibble of byte j)."""
    _, _, _, qh_off, qs_off, _ = _LAYOUT[kind]
    if kind == "q8_0":
        return b.sitofp(_load(b, bp, ir.Constant(_I64, qs_off), _vec(_I8, 32)), _vec(_F32, 32))
    q = _load(b, bp, ir.Constant(_I64, qs_off), _vec(_I8, 16))
    lo = b.and_(q, _vconst(_I8, [15] * 16))
    hi = b.lshr(q, _vconst(_I8, [4] * 16))
    v = b.shuffle_vector(lo, hi, _vconst(_I32, range(32)))  # (32,) 4-bit codes
    if qh_off is None:
        return b.uitofp(v, _vec(_F32, 32))
    return b.uitofp(b.or_(v, _fifth_bits(b, bp, qh_off)), _vec(_F32, 32))


def _block_code_halves(b, bp, kind):
    """The block's codes as two <16 x float> (elements 0..15 and 16..31) for the 4- and 5-bit kinds,
    widened to 32-bit lanes before anything else: the low and high nibbles of the 16 bytes are each
    zero-extended by one instruction, and Q5's fifth bits are added in those lanes with shifts and ands
    (vector ALU ports) instead of byte shuffles. On AVX-512 the shuffles all go to one port, which bound
    the axpy: a Q5_0 row of 576 took 53 ns against Q8_0's 29 (one thread, in cache)."""
    _, _, _, qh_off, qs_off, _ = _LAYOUT[kind]
    q = _load(b, bp, ir.Constant(_I64, qs_off), _vec(_I8, 16))
    halves = [b.zext(b.and_(q, _vconst(_I8, [15] * 16)), _vec(_I32, 16)),
              b.zext(b.lshr(q, _vconst(_I8, [4] * 16)), _vec(_I32, 16))]
    if qh_off is not None:
        qh = _splat(b, _load(b, bp, ir.Constant(_I64, qh_off), _I32), 16)
        for h in range(2):
            bit = b.and_(b.lshr(qh, _vconst(_I32, range(16 * h, 16 * h + 16))), _vconst(_I32, [1] * 16))
            halves[h] = b.or_(halves[h], b.shl(bit, _vconst(_I32, [4] * 16)))
    return [b.uitofp(v, _vec(_F32, 16)) for v in halves]


def _fifth_bits(b, bp, qh_off):
    """<32 x i8>: 16 where element k's fifth bit (bit k of the little-endian u32 qh) is set, else 0.
    Byte k // 8 of qh broadcast to lane k and tested against 1 << (k % 8): byte operations (shifting a
    splat of the 32-bit qh by 0..31 in 32-bit lanes cost Q5_0 decode 15% of its speed)."""
    qh = _load(b, bp, ir.Constant(_I64, qh_off), _vec(_I8, 4))
    lanes = b.shuffle_vector(qh, qh, _vconst(_I32, [k // 8 for k in range(32)]))
    mask = _vconst(_I8, [(1 << (k % 8)) if k % 8 < 7 else -128 for k in range(32)])
    hit = b.icmp_unsigned("!=", b.and_(lanes, mask), _vconst(_I8, [0] * 32))
    return b.select(hit, _vconst(_I8, [16] * 32), _vconst(_I8, [0] * 32))


def _block_scales(b, bp, kind):
    """(d, m) float32 of the block: value = d * code + m."""
    _, d_off, m_off, _, _, bias = _LAYOUT[kind]
    d = b.fpext(_load(b, bp, ir.Constant(_I64, d_off), ir.HalfType()), _F32)
    if m_off is not None:
        m = b.fpext(_load(b, bp, ir.Constant(_I64, m_off), ir.HalfType()), _F32)
    else:
        m = b.fmul(d, ir.Constant(_F32, bias), flags=_FMF)
    return d, m


def _is_vec(ty, dtype, mutable=False):
    return (isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C" and ty.dtype == dtype
            and (ty.mutable or not mutable))


def _make_dot(kind):
    """intrinsic (row (row_bytes,) uint8, x (n_cols,) float32) -> float32 = dequant(row) . x"""
    nbytes = _LAYOUT[kind][0]

    @intrinsic
    def _dot(typingctx, row, x):
        if not (_is_vec(row, types.uint8) and _is_vec(x, types.float32)):
            return None

        def codegen(context, b, sig, args):
            xa = context.make_array(sig.args[1])(context, b, args[1])
            xp = b.bitcast(xa.data, ir.PointerType(_F32))
            rp = _arg_ptr(context, b, sig, args, 0, _I8)
            zero = ir.Constant(_vec(_F32, 8), [0.0] * 8)
            acc_d = cgutils.alloca_once_value(b, zero)  # mem2reg turns these into registers
            acc_m = cgutils.alloca_once_value(b, zero)
            nb = b.lshr(b.extract_value(xa.shape, 0), ir.Constant(_I64, 5))
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                bp = b.gep(rp, [b.mul(i, ir.Constant(_I64, nbytes))])
                xb = b.gep(xp, [b.shl(i, ir.Constant(_I64, 5))])
                xs = [_load(b, xb, ir.Constant(_I64, 8 * k), _vec(_F32, 8), 4) for k in range(4)]
                codes = _block_codes(b, bp, kind)
                t = b.fmul(_part(b, codes, 0), xs[0], flags=_FMF)
                for k in (1, 2, 3):
                    t = b.fadd(t, b.fmul(_part(b, codes, k), xs[k], flags=_FMF), flags=_FMF)
                d, m = _block_scales(b, bp, kind)
                b.store(b.fadd(b.load(acc_d), b.fmul(_splat(b, d, 8), t, flags=_FMF), flags=_FMF), acc_d)
                if kind != "q8_0":
                    sx = b.fadd(b.fadd(xs[0], xs[1], flags=_FMF), b.fadd(xs[2], xs[3], flags=_FMF), flags=_FMF)
                    b.store(b.fadd(b.load(acc_m), b.fmul(_splat(b, m, 8), sx, flags=_FMF), flags=_FMF), acc_m)
            return _hsum8(b, b.fadd(b.load(acc_d), b.load(acc_m), flags=_FMF))

        return types.float32(row, x), codegen

    return _dot


def _make_axpy(kind, dequant):
    """intrinsic (out (n_cols,) float32, a float, row uint8) -> None: out (+)= a * dequant(row).
    dequant=True: out = dequant(row) (and `a` is ignored)."""
    nbytes = _LAYOUT[kind][0]

    @intrinsic
    def _axpy(typingctx, out, a, row):
        if not (_is_vec(out, types.float32, mutable=True) and _is_vec(row, types.uint8)
                and isinstance(a, (types.Float, types.Integer))):
            return None

        def codegen(context, b, sig, args):
            op, nb = _out_f32(context, b, sig, args, 5)
            rp = _arg_ptr(context, b, sig, args, 2, _I8)
            av = context.cast(b, args[1], sig.args[1], types.float32)
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                bp = b.gep(rp, [b.mul(i, ir.Constant(_I64, nbytes))])
                ob = b.gep(op, [b.shl(i, ir.Constant(_I64, 5))])
                if kind == "q8_0":   # one sign extension from memory per 16 codes already
                    codes = _block_codes(b, bp, kind)
                    parts = [_part(b, codes, k, AXPY_LANES) for k in range(2)]
                else:
                    parts = _block_code_halves(b, bp, kind)
                d, m = _block_scales(b, bp, kind)
                if not dequant:
                    d = b.fmul(av, d, flags=_FMF)
                    m = b.fmul(av, m, flags=_FMF)
                ds, ms = _splat(b, d, AXPY_LANES), _splat(b, m, AXPY_LANES)
                for k in range(2):
                    v = b.fmul(ds, parts[k], flags=_FMF)
                    if kind != "q8_0":   # Q8_0 has no offset: adding a * d * 0 cost an add per 8 values
                        v = b.fadd(v, ms, flags=_FMF)
                    if not dequant:
                        v = b.fadd(_load(b, ob, ir.Constant(_I64, AXPY_LANES * k), _vec(_F32, AXPY_LANES), 4), v,
                                   flags=_FMF)
                    _store(b, v, ob, ir.Constant(_I64, AXPY_LANES * k))
            return context.get_dummy_value()

        return types.none(out, a, row), codegen

    return _axpy


def _make_dequant(kind):
    ax = _make_axpy(kind, dequant=True)

    @njit(inline="always")
    def _dequant(out, row):
        ax(out, np.float32(1), row)

    return _dequant


# NUMBA_DISABLE_JIT=1 (STYLE.md: the suite runs once without the JIT): intrinsics cannot run in
# Python, so the same three primitives fall back to gguf.quants.dequantize (slow, same results).
if numba.config.DISABLE_JIT:
    from gguf import quants as _quants

    def _py_kernels(kind):
        qt = _GGML_TYPE[kind]

        def dot(row, x):
            return np.float32(_quants.dequantize(np.asarray(row), qt) @ x)

        def axpy(out, a, row):
            out += np.float32(a) * _quants.dequantize(np.asarray(row), qt)

        def dequant(out, row):
            out[:] = _quants.dequantize(np.asarray(row), qt)

        return dot, axpy, dequant

    _IR = {k: _py_kernels(k) for k in _LAYOUT}
else:
    _IR = {k: (_make_dot(k), _make_axpy(k, dequant=False), _make_dequant(k)) for k in _LAYOUT}

_dot_q8_0, _axpy_q8_0, _dequant_q8_0 = _IR["q8_0"]
_dot_q4_0, _axpy_q4_0, _dequant_q4_0 = _IR["q4_0"]
_dot_q4_1, _axpy_q4_1, _dequant_q4_1 = _IR["q4_1"]
_dot_q5_0, _axpy_q5_0, _dequant_q5_0 = _IR["q5_0"]
_dot_q5_1, _axpy_q5_1, _dequant_q5_1 = _IR["q5_1"]


# ---------------------------------------------------------------------------------------------
# Q8_0: public kernels (rows and vectors must be C-contiguous; n_cols a multiple of 32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q8_0(row, x):
    return _dot_q8_0(row, x)


@njit(cache=True, fastmath=FASTMATH)
def axpy_q8_0(out, a, row):
    _axpy_q8_0(out, np.float32(a), row)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q8_0(out, row):
    _dequant_q8_0(out, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8_0(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dot_q8_0(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q8_0(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            _dequant_q8_0(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q4_0: public kernels (rows and vectors must be C-contiguous; n_cols a multiple of 32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q4_0(row, x):
    return _dot_q4_0(row, x)


@njit(cache=True, fastmath=FASTMATH)
def axpy_q4_0(out, a, row):
    _axpy_q4_0(out, np.float32(a), row)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q4_0(out, row):
    _dequant_q4_0(out, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q4_0(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dot_q4_0(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q4_0(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            _dequant_q4_0(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q4_1: public kernels (rows and vectors must be C-contiguous; n_cols a multiple of 32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q4_1(row, x):
    return _dot_q4_1(row, x)


@njit(cache=True, fastmath=FASTMATH)
def axpy_q4_1(out, a, row):
    _axpy_q4_1(out, np.float32(a), row)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q4_1(out, row):
    _dequant_q4_1(out, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q4_1(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dot_q4_1(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q4_1(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            _dequant_q4_1(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q5_0: public kernels (rows and vectors must be C-contiguous; n_cols a multiple of 32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q5_0(row, x):
    return _dot_q5_0(row, x)


@njit(cache=True, fastmath=FASTMATH)
def axpy_q5_0(out, a, row):
    _axpy_q5_0(out, np.float32(a), row)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q5_0(out, row):
    _dequant_q5_0(out, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q5_0(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dot_q5_0(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q5_0(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            _dequant_q5_0(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q5_1: public kernels (rows and vectors must be C-contiguous; n_cols a multiple of 32)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q5_1(row, x):
    return _dot_q5_1(row, x)


@njit(cache=True, fastmath=FASTMATH)
def axpy_q5_1(out, a, row):
    _axpy_q5_1(out, np.float32(a), row)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q5_1(out, row):
    _dequant_q5_1(out, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q5_1(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dot_q5_1(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q5_1(out, w, X):
    n_rows = w.shape[0]
    n_groups = (n_rows + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            _dequant_q5_1(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# dispatch table: int(GGMLQuantizationType) -> (dot, axpy, dequant_row, matvec, matmat)
# ---------------------------------------------------------------------------------------------
_Q = GGMLQuantizationType
TABLE = {
    int(_Q.F32): (dot_f32, axpy_f32, dequant_row_f32, matvec_f32, matmat_f32),
    int(_Q.F16): (dot_f16, axpy_f16, dequant_row_f16, matvec_f16, matmat_f16),
    int(_Q.BF16): (dot_bf16, axpy_bf16, dequant_row_bf16, matvec_bf16, matmat_bf16),
    int(_Q.Q8_0): (dot_q8_0, axpy_q8_0, dequant_row_q8_0, matvec_q8_0, matmat_q8_0),
    int(_Q.Q4_0): (dot_q4_0, axpy_q4_0, dequant_row_q4_0, matvec_q4_0, matmat_q4_0),
    int(_Q.Q4_1): (dot_q4_1, axpy_q4_1, dequant_row_q4_1, matvec_q4_1, matmat_q4_1),
    int(_Q.Q5_0): (dot_q5_0, axpy_q5_0, dequant_row_q5_0, matvec_q5_0, matmat_q5_0),
    int(_Q.Q5_1): (dot_q5_1, axpy_q5_1, dequant_row_q5_1, matvec_q5_1, matmat_q5_1),
}


# ---------------------------------------------------------------------------------------------
# Decode fast path, llama.cpp style: quantize x once per call site to Q8 blocks, then integer dot
# products per weight block (ggml-cpu's ggml_vec_dot_q4_1_q8_1 & co). On AVX2 each block is
# vpmaddubsw + vpmaddwd + one int->float convert instead of 4 converts and 4 FMAs: measured 2.3x
# the float kernels' single-thread throughput for Q4_1 (tools/bench_kernels.py). Results differ from
# the exact kernels by x's 8-bit quantization (about 0.5% of |dot|), as llama.cpp's do.
#   scratch (q8x_scratch_bytes(n_cols),) uint8 = xq (n_cols,) int8 | xd (n_cols/32,) f32 scale
#                                                | xs (n_cols/32,) f32 exact block sums of x
#   xq = rint(x / xd), xd = max|x_block| / 127 (0 -> xq = 0). Per block:
#   dot = d * xd * sum(codes * xq) + m * xs  (m as above: offset, -8d, -16d or 0).
# One scratch per vector, preallocated by the caller: quantize_x_q8 then any number of
# matvec_q8x_T / dot_q8x_T on it (q, k, v share one; gate, up share one). Nothing allocates.
# ---------------------------------------------------------------------------------------------
def _host_has_avx2():
    try:
        from llvmlite import binding as llb
        return bool(llb.get_host_cpu_features().get("avx2", False))
    except Exception:  # pragma: no cover - unknown host: the generic IR path is always correct
        return False


HAS_AVX2 = _host_has_avx2()
_I16 = ir.IntType(16)


def q8x_scratch_bytes(n_cols):
    """bytes of a quantize_x_q8 scratch for a vector of n_cols (a multiple of 32)."""
    return n_cols + 8 * (n_cols // QK)


@njit(cache=True, inline="always")
def _q8_scale(x, b):
    """(d, 1/d) of block b of x as an 8-bit block: d = max |x| / 127."""
    amax = np.float32(0)
    for j in range(QK):
        amax = max(amax, abs(x[b * QK + j]))
    # in float64, then rounded: the same float32 as amax / 127 correctly rounded (f64 has more than
    # twice f32's precision), even if a fastmath caller's flags turn the division into a multiply by
    # 1/127 (numba can cache a callee compiled under its caller's flags)
    d = np.float32(np.float64(amax) / 127.0)
    return d, (np.float32(1) / d if d > 0 else np.float32(0))


@njit(cache=True)  # no fastmath: d and 1/d bit-exact with the numpy twin (and cheap: O(n_cols))
def quantize_x_q8(scratch, x):
    """scratch (q8x_scratch_bytes(n),) uint8 <- x (n,) float32 as Q8 blocks plus their (quantized) sums."""
    n = x.shape[0]
    nb = n // QK
    xq = scratch[:n].view(np.int8)  # (n,) int8
    xd = scratch[n:n + 4 * nb].view(np.float32)  # (nb,) f32
    xs = scratch[n + 4 * nb:n + 8 * nb].view(np.float32)  # (nb,) f32
    for b in range(nb):
        d, inv = _q8_scale(x, b)
        s = 0
        for j in range(QK):
            q = np.int8(np.rint(x[b * QK + j] * inv))
            xq[b * QK + j] = q
            s += np.int32(q)  # widen: an int8 sum would overflow (and does, without the JIT)
        xd[b] = d
        # the sum of the *quantized* block (llama.cpp's Q8_1 s = d * sum(qs)): the offset term m * xs
        # then uses the same x as the code term, so their rounding errors cancel instead of adding
        # (with the exact sum, Q4_0's (q - 8) split made errors 2-3x those of quantizing x alone)
        xs[b] = d * np.float32(s)


@njit(cache=True)  # no fastmath, as quantize_x_q8: the same d, 1/d and codes
def round_q8(out, x):
    """out (n,) f32 = x (n,) as quantize_x_q8 sees it: each block of 32 rounded to d * q (int8 q).
    A float matrix product over these values computes what the integer dot products of the decode path
    compute from the same blocks, up to float rounding (prompt chunks vs token by token)."""
    nb = x.shape[0] // QK
    for b in range(nb):
        d, inv = _q8_scale(x, b)
        for j in range(QK):
            out[b * QK + j] = np.float32(np.int8(np.rint(x[b * QK + j] * inv))) * d


def _call_x86(b, name, ret, argtys, args):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, argtys), name)
    return b.call(fn, args)


def _block_int_dot(b, bp, xq, kind):
    """<8 x i32> partial sums of codes * xq over the 32 elements of a block."""
    _, _, _, qh_off, qs_off, _ = _LAYOUT[kind]
    signed = kind == "q8_0"
    if signed:
        codes = _load(b, bp, ir.Constant(_I64, qs_off), _vec(_I8, 32))
    else:
        q = _load(b, bp, ir.Constant(_I64, qs_off), _vec(_I8, 16))
        lo = b.and_(q, _vconst(_I8, [15] * 16))
        hi = b.lshr(q, _vconst(_I8, [4] * 16))
        codes = b.shuffle_vector(lo, hi, _vconst(_I32, range(32)))  # (32,) 0..15
        if qh_off is not None:
            codes = b.or_(codes, _fifth_bits(b, bp, qh_off))  # 0..31
    if HAS_AVX2 and not signed:
        # codes are unsigned 0..31 and |xq| <= 127: the i16 pair sums cannot saturate
        p16 = _call_x86(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_vec(_I8, 32)] * 2, [codes, xq])
        return _call_x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16)] * 2,
                         [p16, _vconst(_I16, [1] * 16)])
    if HAS_AVX2:
        halves = []
        for h in range(2):
            sel = _vconst(_I32, range(16 * h, 16 * h + 16))
            c = b.sext(b.shuffle_vector(codes, codes, sel), _vec(_I16, 16))
            v = b.sext(b.shuffle_vector(xq, xq, sel), _vec(_I16, 16))
            halves.append(_call_x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16)] * 2, [c, v]))
        return b.add(halves[0], halves[1])
    c32 = (b.sext if signed else b.zext)(codes, _vec(_I32, 32))  # generic IR, any target
    p = b.mul(c32, b.sext(xq, _vec(_I32, 32)))
    parts = [b.shuffle_vector(p, p, _vconst(_I32, range(8 * k, 8 * k + 8))) for k in range(4)]
    return b.add(b.add(parts[0], parts[1]), b.add(parts[2], parts[3]))


def _make_dot_q8x(kind):
    """intrinsic (row uint8, scratch uint8 from quantize_x_q8, n_cols int) -> float32."""
    nbytes = _LAYOUT[kind][0]

    @intrinsic
    def _dot(typingctx, row, scratch, n_cols):
        if not (_is_vec(row, types.uint8) and _is_vec(scratch, types.uint8)
                and isinstance(n_cols, types.Integer)):
            return None

        def codegen(context, b, sig, args):
            rp = _arg_ptr(context, b, sig, args, 0, _I8)
            sp = _arg_ptr(context, b, sig, args, 1, _I8)
            n = context.cast(b, args[2], sig.args[2], types.int64)
            nb = b.lshr(n, ir.Constant(_I64, 5))
            xdp = b.bitcast(b.gep(sp, [n]), ir.PointerType(_F32))  # (nb,) f32
            xsp = b.gep(xdp, [nb])  # (nb,) f32
            acc = cgutils.alloca_once_value(b, ir.Constant(_vec(_F32, 8), [0.0] * 8))
            acc_m = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                bp = b.gep(rp, [b.mul(i, ir.Constant(_I64, nbytes))])
                xq = _load(b, sp, b.shl(i, ir.Constant(_I64, 5)), _vec(_I8, 32))
                f = b.sitofp(_block_int_dot(b, bp, xq, kind), _vec(_F32, 8))
                d, m = _block_scales(b, bp, kind)
                dd = b.fmul(d, _load(b, xdp, i, _F32, 4), flags=_FMF)
                b.store(b.fadd(b.load(acc), b.fmul(_splat(b, dd, 8), f, flags=_FMF), flags=_FMF), acc)
                if kind != "q8_0":
                    mx = b.fmul(m, _load(b, xsp, i, _F32, 4), flags=_FMF)
                    b.store(b.fadd(b.load(acc_m), mx, flags=_FMF), acc_m)
            return b.fadd(_hsum8(b, b.load(acc)), b.load(acc_m), flags=_FMF)

        return types.float32(row, scratch, n_cols), codegen

    return _dot


if numba.config.DISABLE_JIT:
    def _make_dot_q8x(kind):  # noqa: F811 - plain-Python twin for NUMBA_DISABLE_JIT=1
        def dot(row, scratch, n_cols):
            nb = n_cols // QK
            xq = scratch[:n_cols].view(np.int8).astype(np.float32).reshape(nb, QK)
            xd = scratch[n_cols:n_cols + 4 * nb].view(np.float32)
            xs = scratch[n_cols + 4 * nb:n_cols + 8 * nb].view(np.float32)
            blocks = np.asarray(row).reshape(nb, -1)
            _, d_off, m_off, _, _, bias = _LAYOUT[kind]
            d = blocks[:, d_off:d_off + 2].copy().view(np.float16).astype(np.float32)[:, 0]
            m = bias * d if m_off is None else blocks[:, m_off:m_off + 2].copy().view(np.float16).astype(np.float32)[:, 0]
            dots = np.sum(_codes_py(blocks, kind) * xq, axis=1)
            return np.float32(np.sum(d * xd * dots) + (0 if kind == "q8_0" else np.sum(m * xs)))

        return dot

    def _codes_py(blocks, kind):
        _, _, _, qh_off, qs_off, _ = _LAYOUT[kind]
        if kind == "q8_0":
            return blocks[:, qs_off:].view(np.int8).astype(np.float32)
        q = blocks[:, qs_off:qs_off + 16]
        codes = np.concatenate([q & 15, q >> 4], axis=1).astype(np.int32)
        if qh_off is not None:
            qh = blocks[:, qh_off:qh_off + 4].copy().view(np.uint32)
            codes |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
        return codes.astype(np.float32)


_dq8x_q8_0 = _make_dot_q8x("q8_0")
_dq8x_q4_0 = _make_dot_q8x("q4_0")
_dq8x_q4_1 = _make_dot_q8x("q4_1")
_dq8x_q5_0 = _make_dot_q8x("q5_0")
_dq8x_q5_1 = _make_dot_q8x("q5_1")


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q8_0(row, scratch, n_cols):
    return _dq8x_q8_0(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q8_0(out, w, scratch):
    n_cols = w.shape[1] // Q8_0_BYTES * QK
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q8_0(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q4_0(row, scratch, n_cols):
    return _dq8x_q4_0(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q4_0(out, w, scratch):
    n_cols = w.shape[1] // Q4_0_BYTES * QK
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q4_0(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q4_1(row, scratch, n_cols):
    return _dq8x_q4_1(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q4_1(out, w, scratch):
    n_cols = w.shape[1] // Q4_1_BYTES * QK
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q4_1(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q5_0(row, scratch, n_cols):
    return _dq8x_q5_0(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q5_0(out, w, scratch):
    n_cols = w.shape[1] // Q5_0_BYTES * QK
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q5_0(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q5_1(row, scratch, n_cols):
    return _dq8x_q5_1(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q5_1(out, w, scratch):
    n_cols = w.shape[1] // Q5_1_BYTES * QK
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q5_1(w[i], scratch, n_cols)


# int(GGMLQuantizationType) -> (dot_q8x(row, scratch, n_cols), matvec_q8x(out, w, scratch))
TABLE_Q8X = {
    int(_Q.Q8_0): (dot_q8x_q8_0, matvec_q8x_q8_0),
    int(_Q.Q4_0): (dot_q8x_q4_0, matvec_q8x_q4_0),
    int(_Q.Q4_1): (dot_q8x_q4_1, matvec_q8x_q4_1),
    int(_Q.Q5_0): (dot_q8x_q5_0, matvec_q8x_q5_0),
    int(_Q.Q5_1): (dot_q8x_q5_1, matvec_q8x_q5_1),
}
