"""Decode dots of the K-quants Q2_K..Q6_K on 8-bit input blocks (integer dot products).

The same scheme as the basic types' fast path (quant_basic.py, "Decode fast path"): the input vector is
quantized once per call site by quantize_x_q8 into blocks of 32 (xq int8, xd f32 scale, xs f32 sum of the
quantized block), and every weight block is multiplied with it in integers. llama.cpp does the same with
its Q8_K (one scale per 256); we keep the Q8X scratch's scale per 32, so one scratch serves a vector whatever
mix of types reads it, and the result is exactly dequant(row) . (xq * xd) up to float rounding.

    dot_q8x_T(row, scratch, n_cols) -> float32      (T = q2_k, q3_k, q4_k, q5_k, q6_k)
    matvec_q8x_T(out, w, scratch)                    out (n_rows,) float32 ~= W @ x (prange over rows)
TABLE_Q8X maps int(GGMLQuantizationType) -> (dot_q8x, matvec_q8x), as quant_basic.TABLE_Q8X.

Per super-block of 256 (layouts in quant_k.py's docstring), with j the 32-element Q8X block:
    Q4_K, Q5_K: sum_j d*sc_j*xd_j * sum(q*xq) - dmin * sum_j mn_j*xs_j    (q 0..15 / 0..31, 8 sub-blocks)
    Q6_K:       sum_j d*xd_j * sum_k sc_k * sum((q-32)*xq)               (q 0..63, two 16-sub-blocks a block)
    Q3_K:       as Q6_K with q - 4 (q 0..7 = 2 low bits | the hmask bit << 2) and 6-bit scales - 32
    Q2_K:       sum_j d*xd_j * sum_k sc_k * sum(q*xq) - dmin*xd_j * sum_k mn_k * sum(xq)   (q 0..3, 4-bit sc, mn)
On AVX2 a block is vpmaddubsw (unsigned codes x signed xq, pair sums in 16 bits: 63*127*2 < 2^15) and
vpmaddwd: with ones (Q4_K, Q5_K), or with the two int8 scales of its 16-element sub-blocks (Q2_K, Q3_K,
Q6_K), after the bias x sum(xq) is taken off in 16 bits (pmaddubsw of ones; Q2_K's mins are a vpmaddwd of
those pair sums). The 6-bit scales and mins of a super-block are unpacked as
one <8 x i8> vector each, and d*sc*xd, mn*xs as <8 x float>. Elsewhere (ARM) generic vector IR computes the
same integers. Measured: tools/bench_kernels.py (README "Performance").
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quant_basic import (_arg_ptr, _F32, _FMF, _I8, _I16, _I32, _I64, FASTMATH, HAS_AVX2, QK, _call_x86, _hsum8,
                          _is_vec, _load, _splat, _vconst, _vec, prefetch_ahead)
from .quant_k import Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, QK_K

# kind -> (super-block bytes, offset of qh or None, offset of qs)   (quant_k.py's layouts)
_LAYOUT = {"q4_k": (Q4_K_BYTES, None, 16), "q5_k": (Q5_K_BYTES, 16, 48), "q6_k": (Q6_K_BYTES, 128, 0),
           "q2_k": (Q2_K_BYTES, None, 16), "q3_k": (Q3_K_BYTES, 0, 32)}
_GGML_TYPE = {"q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K,
              "q6_k": GGMLQuantizationType.Q6_K, "q2_k": GGMLQuantizationType.Q2_K,
              "q3_k": GGMLQuantizationType.Q3_K}
_Q6_SCALES, _Q6_D = 192, 208  # Q6_K: int8 scales[16], f16 d


def _c(v, t=_I64):
    return ir.Constant(t, v)


def _lane(b, v, j):
    """lane j of an <8 x float>, splat to 8 lanes."""
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), _vconst(_I32, [j] * 8))


def _reduce32(b, p):
    """<8 x i32> from <32 x i32>: lane k = p[k] + p[k+8] + p[k+16] + p[k+24]."""
    parts = [b.shuffle_vector(p, p, _vconst(_I32, range(8 * k, 8 * k + 8))) for k in range(4)]
    return b.add(b.add(parts[0], parts[1]), b.add(parts[2], parts[3]))


def _udot(b, codes, xq, avx2):
    """<8 x i32> whose lanes sum to sum(codes * xq) over 32 elements; codes unsigned 0..63."""
    if avx2:
        p16 = _call_x86(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_vec(_I8, 32)] * 2, [codes, xq])
        return _call_x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16)] * 2,
                         [p16, _vconst(_I16, [1] * 16)])
    return _reduce32(b, b.mul(b.zext(codes, _vec(_I32, 32)), b.sext(xq, _vec(_I32, 32))))


def _scaled_dot16(b, codes, xq, scales, blk, bias_shift, avx2):
    """<8 x i32> whose lanes sum to sum_k sc * sum((codes - bias) * xq), sc the sub-block scales 2 blk (elements
    0..15) and 2 blk + 1 (16..31) of `scales` (_widened), bias = 1 << bias_shift (Q6_K: 32, Q3_K: 4) or none (bias_shift None)."""
    if avx2:
        p16 = _call_x86(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_vec(_I8, 32)] * 2, [codes, xq])
        if bias_shift is not None:
            o16 = _call_x86(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_vec(_I8, 32)] * 2,
                            [_vconst(_I8, [1] * 32), xq])
            p16 = b.sub(p16, b.shl(o16, _vconst(_I16, [bias_shift] * 16)))  # |pair sums| <= 32*127*2
        return _call_x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16)] * 2,
                         [p16, _halves(b, scales, blk, 16)])
    q = b.zext(codes, _vec(_I32, 32))
    if bias_shift is not None:
        q = b.sub(q, _vconst(_I32, [1 << bias_shift] * 32))
    return _reduce32(b, b.mul(b.mul(q, b.sext(xq, _vec(_I32, 32))), _halves(b, scales, blk, 32)))


def _widened(b, scales, avx2):
    """A super-block's sixteen int8 scales (or mins), sign-extended once to the lanes _halves picks from:
    <16 x i16> on AVX2, <16 x i32> for the generic IR."""
    return b.sext(scales, _vec(_I16 if avx2 else _I32, 16))


def _halves(b, wide, blk, n):
    """<n x lane> of the widened scales: sub-block 2 blk's in the first n/2 lanes, 2 blk + 1's in the rest
    (one shuffle; extracting the two and splatting them cost a few more instructions a block). On AVX2
    (n = 16 16-bit lanes) lane k of vpmaddubsw's result holds elements 2k, 2k + 1: lanes 0..7 are 0..15."""
    return b.shuffle_vector(wide, wide, _vconst(_I32, [2 * blk] * (n // 2) + [2 * blk + 1] * (n // 2)))


def _min_dot16(b, xq, mins, blk, avx2):
    """<8 x i32> whose lanes sum to mn_a * sum(xq[0:16]) + mn_b * sum(xq[16:32]), mn_a, mn_b the mins 2 blk
    and 2 blk + 1 of `mins` (_widened; Q2_K)."""
    if avx2:
        o16 = _call_x86(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_vec(_I8, 32)] * 2,
                        [_vconst(_I8, [1] * 32), xq])
        return _call_x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16)] * 2,
                         [o16, _halves(b, mins, blk, 16)])
    return _reduce32(b, b.mul(b.sext(xq, _vec(_I32, 32)), _halves(b, mins, blk, 32)))


def _scales_mins_k4(b, bp):
    """(<8 x float> scales, <8 x float> mins) of a Q4_K/Q5_K super-block (quant_k._scale_min_k4)."""
    s = _load(b, bp, _c(4), _vec(_I8, 16))  # bytes 4..19: the 12 packed bytes and 4 of what follows
    lo4, hi4 = [63] * 4 + [15] * 4, [0] * 4 + [48] * 4
    a = b.shuffle_vector(s, s, _vconst(_I32, [0, 1, 2, 3, 8, 9, 10, 11]))
    top_sc = b.shuffle_vector(s, s, _vconst(_I32, [0, 1, 2, 3, 0, 1, 2, 3]))
    sc = b.or_(b.and_(a, _vconst(_I8, lo4)),
               b.and_(b.shl(b.lshr(top_sc, _vconst(_I8, [6] * 8)), _vconst(_I8, [4] * 8)), _vconst(_I8, hi4)))
    m = b.shuffle_vector(s, s, _vconst(_I32, [4, 5, 6, 7, 8, 9, 10, 11]))
    top_mn = b.shuffle_vector(s, s, _vconst(_I32, [4, 5, 6, 7, 4, 5, 6, 7]))
    mn = b.or_(b.and_(b.lshr(m, _vconst(_I8, [0] * 4 + [4] * 4)), _vconst(_I8, lo4)),
               b.and_(b.shl(b.lshr(top_mn, _vconst(_I8, [6] * 8)), _vconst(_I8, [4] * 8)), _vconst(_I8, hi4)))
    return b.uitofp(sc, _vec(_F32, 8)), b.uitofp(mn, _vec(_F32, 8))


def _superblock_k4(b, bp, xqp, xdv, xsv, acc, acc_m, kind, avx2):
    """acc (<8 x float>) += the codes' part of one Q4_K/Q5_K super-block; acc_m += its mins' part."""
    _, qh_off, qs_off = _LAYOUT[kind]
    d = b.fpext(_load(b, bp, _c(0), ir.HalfType()), _F32)
    dmin = b.fpext(_load(b, bp, _c(2), ir.HalfType()), _F32)
    sc, mn = _scales_mins_k4(b, bp)
    sdx = b.fmul(b.fmul(_splat(b, d, 8), sc, flags=_FMF), xdv, flags=_FMF)  # d * sc_j * xd_j
    acc_m = b.fadd(acc_m, b.fmul(_splat(b, dmin, 8), b.fmul(mn, xsv, flags=_FMF), flags=_FMF), flags=_FMF)
    qh = _load(b, bp, _c(qh_off), _vec(_I8, 32)) if qh_off is not None else None
    for p in range(4):
        q = _load(b, bp, _c(qs_off + 32 * p), _vec(_I8, 32))
        for k in range(2):
            j = 2 * p + k
            codes = b.and_(q, _vconst(_I8, [15] * 32)) if k == 0 else b.lshr(q, _vconst(_I8, [4] * 32))
            if qh is not None:  # Q5_K: bit j of qh[l] is the fifth bit of sub-block j's element l
                fifth = b.and_(b.lshr(qh, _vconst(_I8, [j] * 32)), _vconst(_I8, [1] * 32))
                codes = b.or_(codes, b.shl(fifth, _vconst(_I8, [4] * 32)))
            xq = _load(b, xqp, _c(32 * j), _vec(_I8, 32))
            f = b.sitofp(_udot(b, codes, xq, avx2), _vec(_F32, 8))
            acc = b.fadd(acc, b.fmul(_lane(b, sdx, j), f, flags=_FMF), flags=_FMF)
    return acc, acc_m


def _superblock_q6(b, bp, xqp, xdv, acc, avx2):
    """acc (<8 x float>) += one Q6_K super-block . its 8 blocks of xq."""
    d = b.fpext(_load(b, bp, _c(_Q6_D), ir.HalfType()), _F32)
    dx = b.fmul(_splat(b, d, 8), xdv, flags=_FMF)  # d * xd_j
    scales = _widened(b, _load(b, bp, _c(_Q6_SCALES), _vec(_I8, 16)), avx2)
    m15, m3 = _vconst(_I8, [15] * 32), _vconst(_I8, [3] * 32)
    for h in range(2):
        ql = [_load(b, bp, _c(64 * h + 32 * t), _vec(_I8, 32)) for t in range(2)]
        qh = _load(b, bp, _c(128 + 32 * h), _vec(_I8, 32))
        for j in range(4):
            lo = ql[j % 2]
            lo = b.and_(lo, m15) if j < 2 else b.lshr(lo, _vconst(_I8, [4] * 32))
            hi = b.and_(b.lshr(qh, _vconst(_I8, [2 * j] * 32)), m3)
            codes = b.or_(lo, b.shl(hi, _vconst(_I8, [4] * 32)))  # 0..63
            blk = 4 * h + j  # elements 128h + 32j.., sub-blocks 8h + 2j and 8h + 2j + 1
            xq = _load(b, xqp, _c(32 * blk), _vec(_I8, 32))
            f = b.sitofp(_scaled_dot16(b, codes, xq, scales, blk, 5, avx2), _vec(_F32, 8))
            acc = b.fadd(acc, b.fmul(_lane(b, dx, blk), f, flags=_FMF), flags=_FMF)
    return acc


def _superblock_q3(b, bp, xqp, xdv, acc, avx2):
    """acc (<8 x float>) += one Q3_K super-block . its 8 blocks of xq: codes (q2 | hbit << 2) - 4 in
    -4..3, sixteen 6-bit scales - 32 (quant_k._scale_q3_k, unpacked as one vector)."""
    d = b.fpext(_load(b, bp, _c(108), ir.HalfType()), _F32)
    dx = b.fmul(_splat(b, d, 8), xdv, flags=_FMF)  # d * xd_j
    a = _load(b, bp, _c(96), _vec(_I8, 8))          # scale bytes 0..7 (the block's 12 end at byte 108)
    c = _load(b, bp, _c(104), _vec(_I8, 4))         # scale bytes 8..11
    lo = b.shuffle_vector(b.and_(a, _vconst(_I8, [15] * 8)), b.lshr(a, _vconst(_I8, [4] * 8)),
                          _vconst(_I32, range(16)))            # lo[i] = a[i] & 15 (i < 8), a[i-8] >> 4
    hi = b.shuffle_vector(c, c, _vconst(_I32, [i & 3 for i in range(16)]))
    hi = b.and_(b.lshr(hi, _vconst(_I8, [2 * (i >> 2) for i in range(16)])), _vconst(_I8, [3] * 16))
    scales = _widened(b, b.sub(b.or_(lo, b.shl(hi, _vconst(_I8, [4] * 16))), _vconst(_I8, [32] * 16)), avx2)
    hmask = _load(b, bp, _c(0), _vec(_I8, 32))
    for h in range(2):
        q = _load(b, bp, _c(32 + 32 * h), _vec(_I8, 32))
        for j in range(4):
            low2 = b.and_(b.lshr(q, _vconst(_I8, [2 * j] * 32)), _vconst(_I8, [3] * 32))
            hbit = b.and_(b.lshr(hmask, _vconst(_I8, [4 * h + j] * 32)), _vconst(_I8, [1] * 32))
            codes = b.or_(low2, b.shl(hbit, _vconst(_I8, [2] * 32)))   # 0..7 = q + 4
            blk = 4 * h + j
            xq = _load(b, xqp, _c(32 * blk), _vec(_I8, 32))
            f = b.sitofp(_scaled_dot16(b, codes, xq, scales, blk, 2, avx2), _vec(_F32, 8))
            acc = b.fadd(acc, b.fmul(_lane(b, dx, blk), f, flags=_FMF), flags=_FMF)
    return acc


def _superblock_q2(b, bp, xqp, xdv, acc, acc_m, avx2):
    """acc (<8 x float>) += the codes' part of one Q2_K super-block (codes 0..3, sixteen 4-bit scales),
    acc_m += its mins' part (sixteen 4-bit mins; subtracted at the end)."""
    d = b.fpext(_load(b, bp, _c(80), ir.HalfType()), _F32)
    dmin = b.fpext(_load(b, bp, _c(82), ir.HalfType()), _F32)
    dx = b.fmul(_splat(b, d, 8), xdv, flags=_FMF)
    mx = b.fmul(_splat(b, dmin, 8), xdv, flags=_FMF)
    sm = _load(b, bp, _c(0), _vec(_I8, 16))
    scales = _widened(b, b.and_(sm, _vconst(_I8, [15] * 16)), avx2)   # 4-bit scales and mins
    mins = _widened(b, b.lshr(sm, _vconst(_I8, [4] * 16)), avx2)
    for h in range(2):
        q = _load(b, bp, _c(16 + 32 * h), _vec(_I8, 32))
        for j in range(4):
            codes = b.and_(b.lshr(q, _vconst(_I8, [2 * j] * 32)), _vconst(_I8, [3] * 32))
            blk = 4 * h + j
            xq = _load(b, xqp, _c(32 * blk), _vec(_I8, 32))
            f = b.sitofp(_scaled_dot16(b, codes, xq, scales, blk, None, avx2), _vec(_F32, 8))
            acc = b.fadd(acc, b.fmul(_lane(b, dx, blk), f, flags=_FMF), flags=_FMF)
            g = b.sitofp(_min_dot16(b, xq, mins, blk, avx2), _vec(_F32, 8))
            acc_m = b.fadd(acc_m, b.fmul(_lane(b, mx, blk), g, flags=_FMF), flags=_FMF)
    return acc, acc_m


def _make_dot_q8x(kind, avx2=HAS_AVX2):
    """intrinsic (row uint8, scratch uint8 from quantize_x_q8, n_cols int) -> float32. avx2=False builds
    the generic IR (what an ARM board runs; tests build it here too)."""
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
            xdp = b.bitcast(b.gep(sp, [n]), ir.PointerType(_F32))  # (n/32,) f32
            xsp = b.gep(xdp, [b.lshr(n, _c(5))])  # (n/32,) f32
            zero = ir.Constant(_vec(_F32, 8), [0.0] * 8)
            acc = cgutils.alloca_once_value(b, zero)
            acc_m = cgutils.alloca_once_value(b, zero)
            with cgutils.for_range(b, b.lshr(n, _c(8))) as loop:
                i = loop.index
                bp = b.gep(rp, [b.mul(i, _c(nbytes))])
                xqp = b.gep(sp, [b.shl(i, _c(8))])
                xdv = _load(b, xdp, b.shl(i, _c(3)), _vec(_F32, 8), 4)
                if kind == "q6_k":
                    b.store(_superblock_q6(b, bp, xqp, xdv, b.load(acc), avx2), acc)
                elif kind == "q3_k":
                    b.store(_superblock_q3(b, bp, xqp, xdv, b.load(acc), avx2), acc)
                elif kind == "q2_k":
                    a, m = _superblock_q2(b, bp, xqp, xdv, b.load(acc), b.load(acc_m), avx2)
                    b.store(a, acc)
                    b.store(m, acc_m)
                else:
                    xsv = _load(b, xsp, b.shl(i, _c(3)), _vec(_F32, 8), 4)
                    a, m = _superblock_k4(b, bp, xqp, xdv, xsv, b.load(acc), b.load(acc_m), kind, avx2)
                    b.store(a, acc)
                    b.store(m, acc_m)
            return _hsum8(b, b.fsub(b.load(acc), b.load(acc_m), flags=_FMF))

        return types.float32(row, scratch, n_cols), codegen

    return _dot


if numba.config.DISABLE_JIT:
    from gguf import quants as _quants

    def _make_dot_q8x(kind, avx2=HAS_AVX2):  # noqa: F811 - plain-Python twin for NUMBA_DISABLE_JIT=1
        qt = _GGML_TYPE[kind]

        def dot(row, scratch, n_cols):
            nb = n_cols // QK
            xq = scratch[:n_cols].view(np.int8).astype(np.float64).reshape(nb, QK)
            xd = scratch[n_cols:n_cols + 4 * nb].view(np.float32).astype(np.float64)
            w = _quants.dequantize(np.asarray(row), qt).astype(np.float64)
            return np.float32(w @ (xq * xd[:, None]).reshape(-1))

        return dot


_dq8x_q4_k = _make_dot_q8x("q4_k")
_dq8x_q5_k = _make_dot_q8x("q5_k")
_dq8x_q6_k = _make_dot_q8x("q6_k")
_dq8x_q2_k = _make_dot_q8x("q2_k")
_dq8x_q3_k = _make_dot_q8x("q3_k")


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q4_k(row, scratch, n_cols):
    return _dq8x_q4_k(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q4_k(out, w, scratch):
    n_cols = w.shape[1] // Q4_K_BYTES * QK_K
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q4_k(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q5_k(row, scratch, n_cols):
    return _dq8x_q5_k(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q5_k(out, w, scratch):
    n_cols = w.shape[1] // Q5_K_BYTES * QK_K
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q5_k(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q6_k(row, scratch, n_cols):
    return _dq8x_q6_k(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q6_k(out, w, scratch):
    n_cols = w.shape[1] // Q6_K_BYTES * QK_K
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q6_k(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q2_k(row, scratch, n_cols):
    return _dq8x_q2_k(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q2_k(out, w, scratch):
    n_cols = w.shape[1] // Q2_K_BYTES * QK_K
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q2_k(w[i], scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH)
def dot_q8x_q3_k(row, scratch, n_cols):
    return _dq8x_q3_k(row, scratch, n_cols)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_q8x_q3_k(out, w, scratch):
    n_cols = w.shape[1] // Q3_K_BYTES * QK_K
    for i in prange(w.shape[0]):
        prefetch_ahead(w, i)
        out[i] = _dq8x_q3_k(w[i], scratch, n_cols)


_Q = GGMLQuantizationType
# int(GGMLQuantizationType) -> (dot_q8x(row, scratch, n_cols), matvec_q8x(out, w, scratch))
TABLE_Q8X = {
    int(_Q.Q4_K): (dot_q8x_q4_k, matvec_q8x_q4_k),
    int(_Q.Q5_K): (dot_q8x_q5_k, matvec_q8x_q5_k),
    int(_Q.Q6_K): (dot_q8x_q6_k, matvec_q8x_q6_k),
    int(_Q.Q2_K): (dot_q8x_q2_k, matvec_q8x_q2_k),
    int(_Q.Q3_K): (dot_q8x_q3_k, matvec_q8x_q3_k),
}
