"""Numba kernels for the K-quant types Q2_K..Q6_K (super-blocks of QK_K = 256) and IQ4_NL (blocks of 32).

Every kernel works on the quantized blocks where they lie (the memory-mapped GGUF rows); no kernel
dequantizes a whole matrix into a copy. Same conventions as quant_basic.py: a weight matrix is a
zero-copy uint8 array w (n_rows, row_bytes), vectors are float32, weights may be read-only.

Per type T (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl):
    dot_T(row, x) -> float32          row (row_bytes,) uint8 . x (n_cols,) float32
    axpy_T(out, a, row)               out (n_cols,) float32 += a * dequant(row)
    dequant_row_T(out, row)           out (n_cols,) float32 = dequant(row)
    matvec_T(out, w, x)               out (n_rows,) float32 = W @ x        (prange over rows)
    matmat_T(out, w, X)               out (n_tok, n_rows) float32 = X @ W.T (prange over row groups)
TABLE maps int(GGMLQuantizationType) -> (dot, axpy, dequant_row, matvec, matmat).

Block layouts (llama.cpp ggml-common.h block_q2_K..block_q6_K, block_iq4_nl; dequantize_row_* in
ggml-quants.c; checked against gguf.quants.dequantize in tests/test_quant_k.py). d, dmin are
little-endian f16. Within a super-block, element i = 128*h + 32*j + l (h half 0..1, j 0..3, l 0..31);
"sub-block" is i // 16 (Q2_K, Q3_K, Q6_K: 16 scales) or i // 32 (Q4_K, Q5_K: 8 scales).
    Q2_K  (84 B):  scales[16] (lo nibble scale, hi nibble min) | qs[64] | d | dmin
                   q = (qs[32h + l] >> 2j) & 3;  x = d*sc*q - dmin*m
    Q3_K  (110 B): hmask[32] | qs[64] | scales[12] (16 x 6-bit, packed) | d
                   q = ((qs[32h + l] >> 2j) & 3) - (0 if hmask[l] bit (4h + j) else 4);  x = d*(sc - 32)*q
    Q4_K  (144 B): d | dmin | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
                   sub-block 2p+k (p 0..3, k 0..1): q = (qs[32p + l] >> 4k) & 15;  x = d*sc*q - dmin*m
    Q5_K  (176 B): d | dmin | scales[12] | qh[32] | qs[128]
                   as Q4_K, q |= ((qh[l] >> (2p+k)) & 1) << 4
    Q6_K  (210 B): ql[128] | qh[64] | scales[16] int8 | d
                   q = ((ql[64h + 32(j%2) + l] >> 4(j//2)) & 15 | ((qh[32h + l] >> 2j) & 3) << 4) - 32
                   x = d*sc*q
    IQ4_NL (18 B): d | qs[16];  x[l] = d*KVALUES[qs[l] & 15],  x[l+16] = d*KVALUES[qs[l] >> 4]
The 6-bit scale/min packing of Q4_K/Q5_K is get_scale_min_k4() in ggml-quants.c (see _scale_min_k4).

Speed notes. Decode is memory-bound, so the inner loops are 16/32-lane loops LLVM vectorizes: nibble
or crumb extraction, int->float, FMA. Bit fields are unpacked by _qbits on 8-bit lanes (numba's own
integer typing widens to int64, which halved Q4_K dot speed: 4-lane qword vectors). Each sub-block accumulates sum(q*x) and (for types with a min)
sum(x) separately, so scales and mins cost one multiply per sub-block, not per weight. matmat decodes
a group of MM_ROWS rows into a scratch block once and reuses it for every token of the prompt.
"""
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import config, njit, prange, types
from numba.extending import intrinsic

# shared with the basic types: the f16 decode intrinsic and the register-blocked matmat core
from .quant_basic import MM_ROWS, _gemm_rows, prefetch_ahead
from .quant_basic import _u16_as_f16_to_f32 as _half_bits_to_f32

# No nnan/ninf: -inf masks elsewhere in the engine must survive (STYLE.md, pynndescent habit).
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}

QK_K = 256  # elements per super-block of the K-quants
K_SCALE_SIZE = 12  # packed 6-bit scales/mins of Q4_K, Q5_K; 16 x 6-bit scales of Q3_K
QK4_NL = 32  # elements per IQ4_NL block
# bytes per block, written as the layout (gguf.constants.GGML_QUANT_SIZES)
Q2_K_BYTES = QK_K // 16 + QK_K // 4 + 2 + 2  # scales, qs, d, dmin = 84
Q3_K_BYTES = QK_K // 8 + QK_K // 4 + K_SCALE_SIZE + 2  # hmask, qs, scales, d = 110
Q4_K_BYTES = 2 + 2 + K_SCALE_SIZE + QK_K // 2  # d, dmin, scales, qs = 144
Q5_K_BYTES = 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2  # d, dmin, scales, qh, qs = 176
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # ql, qh, scales, d = 210
IQ4_NL_BYTES = 2 + QK4_NL // 2  # d, qs = 18

# IQ4_NL's non-linear codebook (ggml-common.h kvalues_iq4nl), as float32 for a direct lookup.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.float32)



# ---------------------------------------------------------------------------------------------
# scalar helpers
# ---------------------------------------------------------------------------------------------
@intrinsic
def _qbits(typingctx, a, sa, ma, b, sb, mb, sh, bias):
    """float32 of (((a >> sa) & ma) | (((b >> sb) & mb) << sh)) - bias, computed on 8-bit lanes.

    a, b are uint8 bytes; the rest are small ints. numba would widen this integer arithmetic to
    int64, and LLVM then vectorizes it on 4-lane qword vectors (vpmovzxbq, vpsrlq); done in i8
    the loop vectorizer unpacks 32 bytes per vector op. Every field here fits in [-128, 127].
    """
    sig = types.float32(a, sa, ma, b, sb, mb, sh, bias)

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        av, sav, mav, bv, sbv, mbv, shv, biasv = [
            v if v.type == i8 else builder.trunc(v, i8) for v in args]
        lo = builder.and_(builder.lshr(av, sav), mav)
        hi = builder.shl(builder.and_(builder.lshr(bv, sbv), mbv), shv)
        return builder.sitofp(builder.sub(builder.or_(lo, hi), biasv), ir.FloatType())

    return sig, codegen


if config.DISABLE_JIT:  # the suite also runs once with NUMBA_DISABLE_JIT=1 (STYLE.md): plain twins
    def _qbits(a, sa, ma, b, sb, mb, sh, bias):  # noqa: F811
        return np.float32((((int(a) >> sa) & ma) | (((int(b) >> sb) & mb) << sh)) - bias)


@njit(inline="always")
def _f16_at(row, off):
    """float32 of the little-endian f16 stored at row[off:off+2]."""
    return _half_bits_to_f32(np.uint16(row[off]) | (np.uint16(row[off + 1]) << np.uint16(8)))


@njit(inline="always")
def _scale_min_k4(row, o, j):
    """(scale, min) of sub-block j (0..7) from the 12 packed bytes at row[o:o+12] (Q4_K, Q5_K).

    Bytes 0-3 hold 6-bit scales 0-3, bytes 4-7 6-bit mins 0-3; scales/mins 4-7 keep their low
    4 bits in bytes 8-11 (lo/hi nibble) and their top 2 bits in the top of bytes 0-3 / 4-7.
    """
    if j < 4:
        sc = row[o + j] & 63
        mn = row[o + j + 4] & 63
    else:
        sc = (row[o + j + 4] & 15) | ((row[o + j - 4] >> 6) << 4)
        mn = (row[o + j + 4] >> 4) | ((row[o + j] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(inline="always")
def _scale_q3_k(row, o, i):
    """signed scale of sub-block i (0..15) from the 12 packed bytes at row[o:o+12] (Q3_K)."""
    lo = (np.int32(row[o + i]) & 15) if i < 8 else (np.int32(row[o + i - 8]) >> 4)
    hi = (np.int32(row[o + 8 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return np.float32((lo | (hi << 4)) - 32)


@njit(inline="always")
def _i8(u):
    """int8 value of the byte u, as float32."""
    v = np.int32(u)
    return np.float32(v - 256 if v > 127 else v)


# ---------------------------------------------------------------------------------------------
# matmat core: out[t, r0 + r] = buf[r] . X[t] for r < nr, every t. Register-blocked 2 tokens x 4
# rows: each pass over k loads 2 x-values and 4 buf-values for 8 FMAs.
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Q2_K: block (84 B) = scales[16] | qs[64] | d | dmin; 16 sub-blocks of 16, 2-bit q, 4-bit scale/min
# byte qs[32h + 16g + l] holds q of elements 128h + 32j + 16g + l (j 0..3) in bits 2j..2j+1
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q2_k(row, x):
    acc = np.float32(0)
    for b in range(x.shape[0] // QK_K):
        o = b * Q2_K_BYTES
        xo = b * QK_K
        d = _f16_at(row, o + 80)
        dmin = _f16_at(row, o + 82)
        for h in range(2):
            for g in range(2):
                qo = o + 16 + 32 * h + 16 * g
                x0 = xo + 128 * h + 16 * g
                s0 = np.float32(0); s1 = np.float32(0); s2 = np.float32(0); s3 = np.float32(0)
                m0 = np.float32(0); m1 = np.float32(0); m2 = np.float32(0); m3 = np.float32(0)
                for l in range(16):
                    q = row[qo + l]
                    u0 = x[x0 + l]; u1 = x[x0 + 32 + l]; u2 = x[x0 + 64 + l]; u3 = x[x0 + 96 + l]
                    s0 += _qbits(q, 0, 3, q, 0, 0, 0, 0) * u0
                    s1 += _qbits(q, 2, 3, q, 0, 0, 0, 0) * u1
                    s2 += _qbits(q, 4, 3, q, 0, 0, 0, 0) * u2
                    s3 += _qbits(q, 6, 3, q, 0, 0, 0, 0) * u3
                    m0 += u0; m1 += u1; m2 += u2; m3 += u3
                so = o + 8 * h + g  # scale byte of sub-block 8h + 2j + g is so + 2j
                c0 = row[so]; c1 = row[so + 2]; c2 = row[so + 4]; c3 = row[so + 6]
                acc += d * (np.float32(c0 & 15) * s0 + np.float32(c1 & 15) * s1
                            + np.float32(c2 & 15) * s2 + np.float32(c3 & 15) * s3)
                acc -= dmin * (np.float32(c0 >> 4) * m0 + np.float32(c1 >> 4) * m1
                               + np.float32(c2 >> 4) * m2 + np.float32(c3 >> 4) * m3)
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_q2_k(out, a, row):
    a = np.float32(a)
    for b in range(out.shape[0] // QK_K):
        o = b * Q2_K_BYTES
        xo = b * QK_K
        ad = a * _f16_at(row, o + 80)
        am = a * _f16_at(row, o + 82)
        for h in range(2):
            for j in range(4):
                sh = 2 * j
                for g in range(2):
                    c = row[o + 8 * h + 2 * j + g]
                    dl = ad * np.float32(c & 15)
                    ml = am * np.float32(c >> 4)
                    qo = o + 16 + 32 * h + 16 * g
                    x0 = xo + 128 * h + 32 * j + 16 * g
                    for l in range(16):
                        out[x0 + l] += dl * _qbits(row[qo + l], sh, 3, row[qo + l], 0, 0, 0, 0) - ml


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q2_k(out, row):
    out[:] = 0
    axpy_q2_k(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q2_k(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_q2_k(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q2_k(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_q2_k(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q3_K: block (110 B) = hmask[32] | qs[64] | scales[12] | d; 16 sub-blocks of 16, 3-bit q, 6-bit scale
# low 2 bits as Q2_K; the high bit of element 128h + 32j + l is bit 4h + j of hmask[l], and a set
# bit means "no -4 offset" (dequantize_row_q3_K)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q3_k(row, x):
    acc = np.float32(0)
    for b in range(x.shape[0] // QK_K):
        o = b * Q3_K_BYTES
        xo = b * QK_K
        d = _f16_at(row, o + 108)
        for h in range(2):
            sh = 4 * h
            for g in range(2):
                qo = o + 32 + 32 * h + 16 * g
                ho = o + 16 * g
                x0 = xo + 128 * h + 16 * g
                s0 = np.float32(0); s1 = np.float32(0); s2 = np.float32(0); s3 = np.float32(0)
                for l in range(16):
                    q = row[qo + l]
                    m = row[ho + l]
                    s0 += _qbits(q, 0, 3, m, sh, 1, 2, 4) * x[x0 + l]
                    s1 += _qbits(q, 2, 3, m, sh + 1, 1, 2, 4) * x[x0 + 32 + l]
                    s2 += _qbits(q, 4, 3, m, sh + 2, 1, 2, 4) * x[x0 + 64 + l]
                    s3 += _qbits(q, 6, 3, m, sh + 3, 1, 2, 4) * x[x0 + 96 + l]
                i = 8 * h + g  # sub-block of (h, j, g) is i + 2j
                acc += d * (_scale_q3_k(row, o + 96, i) * s0 + _scale_q3_k(row, o + 96, i + 2) * s1
                            + _scale_q3_k(row, o + 96, i + 4) * s2 + _scale_q3_k(row, o + 96, i + 6) * s3)
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_q3_k(out, a, row):
    a = np.float32(a)
    for b in range(out.shape[0] // QK_K):
        o = b * Q3_K_BYTES
        xo = b * QK_K
        ad = a * _f16_at(row, o + 108)
        for h in range(2):
            for j in range(4):
                for g in range(2):
                    dl = ad * _scale_q3_k(row, o + 96, 8 * h + 2 * j + g)
                    qo = o + 32 + 32 * h + 16 * g
                    ho = o + 16 * g
                    x0 = xo + 128 * h + 32 * j + 16 * g
                    for l in range(16):
                        out[x0 + l] += dl * _qbits(row[qo + l], 2 * j, 3, row[ho + l], 4 * h + j, 1, 2, 4)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q3_k(out, row):
    out[:] = 0
    axpy_q3_k(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q3_k(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_q3_k(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q3_k(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_q3_k(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q4_K: block (144 B) = d | dmin | scales[12] | qs[128]; 8 sub-blocks of 32, 4-bit q, 6-bit scale/min
# qs[32p + l]: low nibble = element 64p + l (sub-block 2p), high nibble = element 64p + 32 + l
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q4_k(row, x):
    acc = np.float32(0)
    for b in range(x.shape[0] // QK_K):
        o = b * Q4_K_BYTES
        xo = b * QK_K
        d = _f16_at(row, o)
        dmin = _f16_at(row, o + 2)
        for p in range(4):
            qo = o + 16 + 32 * p
            x0 = xo + 64 * p
            s0 = np.float32(0); s1 = np.float32(0); m0 = np.float32(0); m1 = np.float32(0)
            for l in range(32):
                q = row[qo + l]
                u = x[x0 + l]
                v = x[x0 + 32 + l]
                s0 += _qbits(q, 0, 15, q, 0, 0, 0, 0) * u
                s1 += _qbits(q, 4, 15, q, 0, 0, 0, 0) * v
                m0 += u
                m1 += v
            sc0, mn0 = _scale_min_k4(row, o + 4, 2 * p)
            sc1, mn1 = _scale_min_k4(row, o + 4, 2 * p + 1)
            acc += d * (sc0 * s0 + sc1 * s1) - dmin * (mn0 * m0 + mn1 * m1)
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_q4_k(out, a, row):
    a = np.float32(a)
    for b in range(out.shape[0] // QK_K):
        o = b * Q4_K_BYTES
        xo = b * QK_K
        ad = a * _f16_at(row, o)
        am = a * _f16_at(row, o + 2)
        for p in range(4):
            sc0, mn0 = _scale_min_k4(row, o + 4, 2 * p)
            sc1, mn1 = _scale_min_k4(row, o + 4, 2 * p + 1)
            d0 = ad * sc0; c0 = am * mn0; d1 = ad * sc1; c1 = am * mn1
            qo = o + 16 + 32 * p
            x0 = xo + 64 * p
            for l in range(32):
                q = row[qo + l]
                out[x0 + l] += d0 * _qbits(q, 0, 15, q, 0, 0, 0, 0) - c0
                out[x0 + 32 + l] += d1 * _qbits(q, 4, 15, q, 0, 0, 0, 0) - c1


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q4_k(out, row):
    out[:] = 0
    axpy_q4_k(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q4_k(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_q4_k(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q4_k(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_q4_k(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q5_K: block (176 B) = d | dmin | scales[12] | qh[32] | qs[128]; as Q4_K plus a 5th bit:
# bit s of qh[l] is the high bit of element 32s + l
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q5_k(row, x):
    acc = np.float32(0)
    for b in range(x.shape[0] // QK_K):
        o = b * Q5_K_BYTES
        xo = b * QK_K
        d = _f16_at(row, o)
        dmin = _f16_at(row, o + 2)
        for p in range(4):
            qo = o + 48 + 32 * p
            ho = o + 16
            x0 = xo + 64 * p
            sh = 2 * p
            s0 = np.float32(0); s1 = np.float32(0); m0 = np.float32(0); m1 = np.float32(0)
            for l in range(32):
                q = row[qo + l]
                m = row[ho + l]
                u = x[x0 + l]
                v = x[x0 + 32 + l]
                s0 += _qbits(q, 0, 15, m, sh, 1, 4, 0) * u
                s1 += _qbits(q, 4, 15, m, sh + 1, 1, 4, 0) * v
                m0 += u
                m1 += v
            sc0, mn0 = _scale_min_k4(row, o + 4, 2 * p)
            sc1, mn1 = _scale_min_k4(row, o + 4, 2 * p + 1)
            acc += d * (sc0 * s0 + sc1 * s1) - dmin * (mn0 * m0 + mn1 * m1)
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_q5_k(out, a, row):
    a = np.float32(a)
    for b in range(out.shape[0] // QK_K):
        o = b * Q5_K_BYTES
        xo = b * QK_K
        ad = a * _f16_at(row, o)
        am = a * _f16_at(row, o + 2)
        for p in range(4):
            sc0, mn0 = _scale_min_k4(row, o + 4, 2 * p)
            sc1, mn1 = _scale_min_k4(row, o + 4, 2 * p + 1)
            d0 = ad * sc0; c0 = am * mn0; d1 = ad * sc1; c1 = am * mn1
            qo = o + 48 + 32 * p
            ho = o + 16
            x0 = xo + 64 * p
            sh = 2 * p
            for l in range(32):
                q = row[qo + l]
                m = row[ho + l]
                out[x0 + l] += d0 * _qbits(q, 0, 15, m, sh, 1, 4, 0) - c0
                out[x0 + 32 + l] += d1 * _qbits(q, 4, 15, m, sh + 1, 1, 4, 0) - c1


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q5_k(out, row):
    out[:] = 0
    axpy_q5_k(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q5_k(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_q5_k(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q5_k(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_q5_k(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# Q6_K: block (210 B) = ql[128] | qh[64] | scales[16] int8 | d; 16 sub-blocks of 16, 6-bit q - 32
# for l in 0..31 (dequantize_row_q6_K): ql[64h + l] holds elements 128h + l (lo) and 128h + 64 + l
# (hi nibble), ql[64h + 32 + l] elements 128h + 32 + l and 128h + 96 + l; qh[32h + l] bits 2j..2j+1
# are the top bits of element 128h + 32j + l
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_q6_k(row, x):
    acc = np.float32(0)
    for b in range(x.shape[0] // QK_K):
        o = b * Q6_K_BYTES
        xo = b * QK_K
        d = _f16_at(row, o + 208)
        for h in range(2):
            for g in range(2):
                lo = o + 64 * h + 16 * g
                ho = o + 128 + 32 * h + 16 * g
                x0 = xo + 128 * h + 16 * g
                s0 = np.float32(0); s1 = np.float32(0); s2 = np.float32(0); s3 = np.float32(0)
                for l in range(16):
                    a = row[lo + l]
                    c = row[lo + 32 + l]
                    m = row[ho + l]
                    s0 += _qbits(a, 0, 15, m, 0, 3, 4, 32) * x[x0 + l]
                    s1 += _qbits(c, 0, 15, m, 2, 3, 4, 32) * x[x0 + 32 + l]
                    s2 += _qbits(a, 4, 15, m, 4, 3, 4, 32) * x[x0 + 64 + l]
                    s3 += _qbits(c, 4, 15, m, 6, 3, 4, 32) * x[x0 + 96 + l]
                so = o + 192 + 8 * h + g  # scale of sub-block 8h + 2j + g is at so + 2j
                acc += d * (_i8(row[so]) * s0 + _i8(row[so + 2]) * s1
                            + _i8(row[so + 4]) * s2 + _i8(row[so + 6]) * s3)
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_q6_k(out, a, row):
    a = np.float32(a)
    for b in range(out.shape[0] // QK_K):
        o = b * Q6_K_BYTES
        xo = b * QK_K
        ad = a * _f16_at(row, o + 208)
        for h in range(2):
            for g in range(2):
                so = o + 192 + 8 * h + g
                d0 = ad * _i8(row[so]); d1 = ad * _i8(row[so + 2])
                d2 = ad * _i8(row[so + 4]); d3 = ad * _i8(row[so + 6])
                lo = o + 64 * h + 16 * g
                ho = o + 128 + 32 * h + 16 * g
                x0 = xo + 128 * h + 16 * g
                for l in range(16):
                    p = row[lo + l]
                    c = row[lo + 32 + l]
                    m = row[ho + l]
                    out[x0 + l] += d0 * _qbits(p, 0, 15, m, 0, 3, 4, 32)
                    out[x0 + 32 + l] += d1 * _qbits(c, 0, 15, m, 2, 3, 4, 32)
                    out[x0 + 64 + l] += d2 * _qbits(p, 4, 15, m, 4, 3, 4, 32)
                    out[x0 + 96 + l] += d3 * _qbits(c, 4, 15, m, 6, 3, 4, 32)


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_q6_k(out, row):
    out[:] = 0
    axpy_q6_k(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q6_k(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_q6_k(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_q6_k(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_q6_k(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# IQ4_NL: block (18 B) = d | qs[16]; qs[l] low nibble indexes KVALUES for element l, high for l + 16
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FASTMATH)
def dot_iq4_nl(row, x):
    kv = KVALUES_IQ4NL
    acc = np.float32(0)
    for b in range(x.shape[0] // QK4_NL):
        o = b * IQ4_NL_BYTES
        xo = b * QK4_NL
        s = np.float32(0)
        for l in range(16):
            q = row[o + 2 + l]
            s += kv[q & 15] * x[xo + l] + kv[q >> 4] * x[xo + 16 + l]
        acc += _f16_at(row, o) * s
    return acc


@njit(cache=True, fastmath=FASTMATH)
def axpy_iq4_nl(out, a, row):
    kv = KVALUES_IQ4NL
    a = np.float32(a)
    for b in range(out.shape[0] // QK4_NL):
        o = b * IQ4_NL_BYTES
        xo = b * QK4_NL
        ad = a * _f16_at(row, o)
        for l in range(16):
            q = row[o + 2 + l]
            out[xo + l] += ad * kv[q & 15]
            out[xo + 16 + l] += ad * kv[q >> 4]


@njit(cache=True, fastmath=FASTMATH)
def dequant_row_iq4_nl(out, row):
    out[:] = 0
    axpy_iq4_nl(out, 1.0, row)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_iq4_nl(out, w, x):
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = dot_iq4_nl(w[i], x)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matmat_iq4_nl(out, w, X):
    n_rows = w.shape[0]
    for g in prange((n_rows + MM_ROWS - 1) // MM_ROWS):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_rows - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)  # decoded rows of this group
        for r in range(nr):
            dequant_row_iq4_nl(buf[r], w[r0 + r])
        _gemm_rows(out, buf, X, r0, nr)


# ---------------------------------------------------------------------------------------------
# dispatch table: int(GGMLQuantizationType) -> (dot, axpy, dequant_row, matvec, matmat)
# ---------------------------------------------------------------------------------------------
TABLE = {
    int(GGMLQuantizationType.Q2_K): (dot_q2_k, axpy_q2_k, dequant_row_q2_k, matvec_q2_k, matmat_q2_k),
    int(GGMLQuantizationType.Q3_K): (dot_q3_k, axpy_q3_k, dequant_row_q3_k, matvec_q3_k, matmat_q3_k),
    int(GGMLQuantizationType.Q4_K): (dot_q4_k, axpy_q4_k, dequant_row_q4_k, matvec_q4_k, matmat_q4_k),
    int(GGMLQuantizationType.Q5_K): (dot_q5_k, axpy_q5_k, dequant_row_q5_k, matvec_q5_k, matmat_q5_k),
    int(GGMLQuantizationType.Q6_K): (dot_q6_k, axpy_q6_k, dequant_row_q6_k, matvec_q6_k, matmat_q6_k),
    int(GGMLQuantizationType.IQ4_NL): (dot_iq4_nl, axpy_iq4_nl, dequant_row_iq4_nl, matvec_iq4_nl,
                                       matmat_iq4_nl),
}
