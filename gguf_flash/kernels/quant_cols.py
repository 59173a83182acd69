"""A bundle's down part in its source's own codes (docs/flash-gguf.md, "Column down parts").

Column i of a quantized W_down (n_embd rows, n_ff columns) is not a run of whole ggml blocks: its n_embd
values lie in n_embd different rows, each in the block of 32 columns that holds i. So the converter
either re-quantizes the column (Q8_0: 34 bytes per 32 values, and a second rounding), or keeps the
source's codes of the column and moves the blocks' scales to a table that stays in RAM:

    value[r] = scale[i // 32, r] * code[r] + min[i // 32, r]        r = 0 .. n_embd - 1

scale and min (n_ff / 32, n_embd) float16 are shared by the 32 neurons of a source block; a neuron's
own bytes are its codes only. Float16 because the Q4_0/Q4_1/Q5_0/Q8_0 blocks' own d and m are (the
values are the source's exactly; Q4_K's d x sub-scale is rounded to float16, 2^-11 of itself), and
because float32 tables cost the axpy more than the bytes it saves: SmolLM2's bundle FFN on 2 threads,
rows in RAM, 94 -> 78.5 ns a row (tools/bench_sparse.py), against 80.6 with Q8_0 down parts. Two
kinds of codes (pseudo type ids, not ggml's):

    COLS_U4  n_embd / 2 bytes: per 32 values 16 bytes, byte j holds value j (low nibble) and j + 16
             (high nibble), ggml's Q4 order; unsigned 0..15.    Q4_0, Q4_1, Q4_K sources
    COLS_I8  n_embd bytes, signed.  min is 0 (no table).          Q8_0, Q5_0 sources

SmolLM2's Q4_1 down column: 288 bytes instead of Q8_0's 612, and the source's values exactly.

Kernels (out (n,) float32, s and m (n,) uint16 rows of the tables (float16 bits); row (n / 2 or n,) uint8):
    axpy_cols_u4_centred(out, a, row, s)   out += a * s * (code - 8): the decode step's (dispatch.axpy_down)
    axpy_cols_u4_pair(out, a0, row0, a1, row1, s)   the same for two rows of one source block at once
    add_block_mins(out, s, m, hsum)    ... and the rest, a * (min + 8 s), once per block and layer
    axpy_cols_i8(out, a, row, s)       out += a * (s * code)     (axpy_cols_i8_pair: two rows)
    dequant_cols_u4(out, row, s, m)    out = s * code + m
    dequant_cols_i8(out, row, s)       out = s * code
decode_cols (numpy) is their twin.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quant_basic import (FASTMATH, _F32, _FMF, _I8, _I32, _I64, _arg_ptr, _is_vec, _load, _out_f32, _part, _splat,
                          _store, _vconst, _vec)

COLS_U4 = 200
COLS_I8 = 201
COLS_TYPES = (COLS_U4, COLS_I8)
COLS_NAMES = {COLS_U4: "cols-u4", COLS_I8: "cols-i8"}
COLS_BLOCK = 32     # neurons that share a row of the tables (the source's block of columns)


def cols_bytes(kind: int, n: int) -> int:
    """Bytes of one column of n values."""
    return n // 2 if kind == COLS_U4 else n


def cols_has_min(kind: int) -> bool:
    return kind == COLS_U4


def decode_cols(kind: int, row: np.ndarray, s: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """(n,) float32 values of a column (numpy; the kernels' twin and the converter's check); s, m float16
    (or their uint16 bits) or float32."""
    row = np.asarray(row, np.uint8)
    s = _as_f32(s)
    m = None if m is None else _as_f32(m)
    if kind == COLS_U4:
        q = row.reshape(-1, 16)
        codes = np.concatenate([q & 15, q >> 4], axis=1).reshape(-1).astype(np.float32)
        return s * codes + m
    return s * row.view(np.int8).astype(np.float32)


def _as_f32(t):
    t = np.asarray(t)
    return (t.view(np.float16) if t.dtype == np.uint16 else t).astype(np.float32)


def _half16(b, p, e):
    """16 float16 table entries at element e of p, widened to float32 (vcvtph2ps on x86)."""
    return b.fpext(_load(b, p, e, _vec(ir.HalfType(), 16), 2), _vec(_F32, 16))


def _splat_arg(context, b, sig, args, k):
    """Scalar argument k of an intrinsic as float32, in all 16 lanes."""
    return _splat(b, context.cast(b, args[k], sig.args[k], types.float32), 16)


def _codes16(b, kind, rp, i, centre=True):
    """The two 16-lane float vectors of the codes of block i (32 values) of a column: U4 widened from
    its nibbles (centred, code - 8, unless centre is False), I8 as stored."""
    if kind == COLS_U4:
        q = _load(b, rp, b.shl(i, ir.Constant(_I64, 4)), _vec(_I8, 16))
        halves = [b.zext(b.and_(q, _vconst(_I8, [15] * 16)), _vec(_I32, 16)),
                  b.zext(b.lshr(q, _vconst(_I8, [4] * 16)), _vec(_I32, 16))]
        if centre:
            halves = [b.sub(h, _vconst(_I32, [8] * 16)) for h in halves]
        return [b.sitofp(h, _vec(_F32, 16)) for h in halves]
    codes = b.sitofp(_load(b, rp, b.shl(i, ir.Constant(_I64, 5)), _vec(_I8, 32)), _vec(_F32, 32))
    return [_part(b, codes, k, 16) for k in range(2)]


def _make_axpy_cols(kind, dequant, with_min=True):
    """intrinsic (out, a, row, s, m) -> None: out (+)= a * (s * code + m); m unused for COLS_I8.
    with_min=False (COLS_U4, the decode step): out += a * s * (code - 8), the rest, a * (m + 8 s), added
    once per block (add_block_mins). Centred codes: with the min split off whole, both sums were ~8x the
    output they cancel to, and the decode step's rounding differed from the prompt chunk's by 2x more."""

    @intrinsic
    def _axpy(typingctx, out, a, row, s, m):
        if not (_is_vec(out, types.float32, mutable=True) and _is_vec(row, types.uint8)
                and _is_vec(s, types.uint16) and _is_vec(m, types.uint16)
                and isinstance(a, (types.Float, types.Integer))):
            return None

        def codegen(context, b, sig, args):
            op, nb = _out_f32(context, b, sig, args, 5)
            rp = _arg_ptr(context, b, sig, args, 2, _I8)
            sp, mp = (_arg_ptr(context, b, sig, args, k, ir.HalfType()) for k in (3, 4))
            av = _splat_arg(context, b, sig, args, 1)
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                e0 = b.shl(i, ir.Constant(_I64, 5))           # first element of the block
                parts = _codes16(b, kind, rp, i, centre=not with_min)
                for k in range(2):
                    e = b.add(e0, ir.Constant(_I64, 16 * k))
                    v = b.fmul(_half16(b, sp, e), parts[k], flags=_FMF)
                    if kind == COLS_U4 and with_min:
                        v = b.fadd(v, _half16(b, mp, e), flags=_FMF)
                    if not dequant:
                        v = b.fadd(_load(b, op, e, _vec(_F32, 16), 4), b.fmul(av, v, flags=_FMF), flags=_FMF)
                    _store(b, v, op, e)
            return context.get_dummy_value()

        return types.none(out, a, row, s, m), codegen

    return _axpy


def _make_axpy_cols_pair(kind):
    """intrinsic (out, a0, row0, a1, row1, s) -> None: out += s * (a0 * code0 + a1 * code1), codes
    centred for COLS_U4 (its mins as for one row: add_block_mins). Two rows of one source block share
    the table's row s: one widening of it, one multiply and one pass over out for both (SmolLM2's U4 rows,
    one thread, in cache: 33-35 ns a row against 43-47 one at a time)."""

    @intrinsic
    def _pair(typingctx, out, a0, row0, a1, row1, s):
        if not (_is_vec(out, types.float32, mutable=True) and _is_vec(row0, types.uint8)
                and _is_vec(row1, types.uint8) and _is_vec(s, types.uint16)
                and isinstance(a0, (types.Float, types.Integer)) and isinstance(a1, (types.Float, types.Integer))):
            return None

        def codegen(context, b, sig, args):
            op, nb = _out_f32(context, b, sig, args, 5)
            rp0, rp1 = (_arg_ptr(context, b, sig, args, k, _I8) for k in (2, 4))
            sp = _arg_ptr(context, b, sig, args, 5, ir.HalfType())
            av0, av1 = (_splat_arg(context, b, sig, args, k) for k in (1, 3))
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                e0 = b.shl(i, ir.Constant(_I64, 5))
                p0, p1 = _codes16(b, kind, rp0, i), _codes16(b, kind, rp1, i)
                for k in range(2):
                    e = b.add(e0, ir.Constant(_I64, 16 * k))
                    t = b.fadd(b.fmul(av0, p0[k], flags=_FMF), b.fmul(av1, p1[k], flags=_FMF), flags=_FMF)
                    v = b.fmul(_half16(b, sp, e), t, flags=_FMF)
                    _store(b, b.fadd(_load(b, op, e, _vec(_F32, 16), 4), v, flags=_FMF), op, e)
            return context.get_dummy_value()

        return types.none(out, a0, row0, a1, row1, s), codegen

    return _pair


@intrinsic
def _add_min8(typingctx, out, a, s, m):
    """out (n,) f32 += a * (m + 8 s), s and m (n,) uint16 (float16 bits), 16 lanes at a time (n a multiple
    of 16): computed here from the float16 tables rather than held as a float32 table (3.3 MiB on
    SmolLM2, which came off the window: at the dense peak flash read 7.7 MiB a token against 2.6)."""
    if not (_is_vec(out, types.float32, mutable=True) and _is_vec(s, types.uint16) and _is_vec(m, types.uint16)
            and isinstance(a, (types.Float, types.Integer))):
        return None

    def codegen(context, b, sig, args):
        op, nv = _out_f32(context, b, sig, args, 4)
        sp, mp = (_arg_ptr(context, b, sig, args, k, ir.HalfType()) for k in (2, 3))
        av = _splat_arg(context, b, sig, args, 1)
        eight = _splat(b, ir.Constant(_F32, 8.0), 16)
        with cgutils.for_range(b, nv) as loop:
            e = b.shl(loop.index, ir.Constant(_I64, 4))
            v = b.fadd(_half16(b, mp, e), b.fmul(eight, _half16(b, sp, e), flags=_FMF), flags=_FMF)
            _store(b, b.fadd(_load(b, op, e, _vec(_F32, 16), 4), b.fmul(av, v, flags=_FMF), flags=_FMF), op, e)
        return context.get_dummy_value()

    return types.none(out, a, s, m), codegen


if numba.config.DISABLE_JIT:   # plain-Python twins (STYLE.md: the suite runs once without the JIT)
    def _py(kind, dequant):
        def f(out, a, row, s, m):
            v = decode_cols(kind, row, s, m)
            if dequant:
                out[:] = v
            else:
                out += np.float32(a) * v
        return f

    def _py_nomin(out, a, row, s, m):
        out += np.float32(a) * (decode_cols(COLS_U4, row, s, np.zeros_like(s)) - 8 * _as_f32(s))

    _axpy_i8 = _py(COLS_I8, False)
    _deq_u4, _deq_i8 = _py(COLS_U4, True), _py(COLS_I8, True)
    _axpy_u4_nomin = _py_nomin

    def _add_min8(out, a, s, m):  # noqa: F811
        out += np.float32(a) * (_as_f32(m) + 8 * _as_f32(s))

    def _py_pair(kind):
        def f(out, a0, row0, a1, row1, s):
            z = np.zeros_like(s)
            c0, c1 = (decode_cols(kind, r, np.ones_like(_as_f32(s)), None if kind == COLS_I8 else z)
                      for r in (row0, row1))
            if kind == COLS_U4:
                c0, c1 = c0 - 8, c1 - 8
            out += _as_f32(s) * (np.float32(a0) * c0 + np.float32(a1) * c1)
        return f

    _pair_u4, _pair_i8 = _py_pair(COLS_U4), _py_pair(COLS_I8)
else:
    _axpy_i8 = _make_axpy_cols(COLS_I8, False)
    _deq_u4, _deq_i8 = _make_axpy_cols(COLS_U4, True), _make_axpy_cols(COLS_I8, True)
    _axpy_u4_nomin = _make_axpy_cols(COLS_U4, False, with_min=False)
    _pair_u4, _pair_i8 = _make_axpy_cols_pair(COLS_U4), _make_axpy_cols_pair(COLS_I8)

# (out, a, row, s, m), inlined by dispatch.axpy_down: COLS_U4 without its min, which the decode step
# adds once per source block (add_block_mins: a second table row per row was 18 ns of its ~75). The
# prompt chunk decodes a row once for all its tokens, with its min (dispatch.dequant_down).
AXPY_IR = {COLS_U4: _axpy_u4_nomin, COLS_I8: _axpy_i8}
# (out, a0, row0, a1, row1, s): two stored rows of one source block (dispatch.axpy_down_pair)
PAIR_IR = {COLS_U4: _pair_u4, COLS_I8: _pair_i8}
DEQUANT_IR = {COLS_U4: _deq_u4, COLS_I8: _deq_i8}


@njit(cache=True, fastmath=FASTMATH)
def axpy_cols_u4_centred(out, a, row, s):
    _axpy_u4_nomin(out, np.float32(a), row, s, s)


@njit(cache=True, fastmath=FASTMATH)
def axpy_cols_u4_pair(out, a0, row0, a1, row1, s):
    _pair_u4(out, np.float32(a0), row0, np.float32(a1), row1, s)


@njit(cache=True, fastmath=FASTMATH)
def axpy_cols_i8_pair(out, a0, row0, a1, row1, s):
    _pair_i8(out, np.float32(a0), row0, np.float32(a1), row1, s)


@njit(cache=True, fastmath=FASTMATH)
def axpy_cols_i8(out, a, row, s):
    _axpy_i8(out, np.float32(a), row, s, s)


@njit(cache=True, fastmath=FASTMATH)
def dequant_cols_u4(out, row, s, m):
    _deq_u4(out, np.float32(1), row, s, m)


@njit(cache=True, fastmath=FASTMATH)
def dequant_cols_i8(out, row, s):
    _deq_i8(out, np.float32(1), row, s, s)


@njit(cache=True, fastmath=FASTMATH)
def add_block_mins(out, scale, dmin, hsum):
    """out (n,) += sum over blocks b of (dmin[b] + 8 scale[b]) (n,) * (sum over c of hsum[c, b]): what
    the decode step's COLS_U4 rows left out (axpy_cols_u4_centred); scale, dmin (n_blocks, n) uint16
    (float16 bits), hsum (n_part, >= n_blocks) f32 their h summed per source block (in c order, so the same
    at every cap)."""
    for b in range(scale.shape[0]):
        t = np.float32(0.0)
        for c in range(hsum.shape[0]):
            t += hsum[c, b]
        if t != 0.0:
            _add_min8(out, t, scale[b], dmin[b])
