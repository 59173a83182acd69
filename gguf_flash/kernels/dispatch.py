"""Dispatch from a ggml type id to its kernels, inside numba code.

The forward pass is one compiled function per token, so the per-matrix choice of kernel happens here:
one comparison chain per matrix call (not per row or block); the inner loops are the per-type kernels
of quant_basic.py and quant_k.py. A weight is addressed as (offset, n_rows, row_bytes, qtype) into the
memory-mapped file `blob` (file_size,) uint8, so one compiled forward serves every mix of the types in
its type set.

The type set (`tset`, from `type_set`) is the last argument of every kernel that reaches a per-type
kernel: a tuple with one element per SUPPORTED type, 0 where the model has the type and None where not.
numba specializes on its element types, so each chain below is generated (an @overload) with the
model's types only: a first run compiles 2 of the 14 types' kernels for SmolLM2 (Q4_1, Q8_0), and the
compiled functions of one type set are cached apart from another's (gguf_flash/firstrun.py).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import quant_basic as qb
from . import quant_cols as qc
from . import quant_k as qk
from . import quant_kq8 as kq8

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


def type_set(qtypes) -> tuple:
    """The type set of these ggml type ids: (len(SUPPORTED),) tuple, 0 for a type present, None else."""
    have = {int(t) for t in qtypes}
    return tuple(0 if t in have else None for t in SUPPORTED)


def part_type_sets(layer_types) -> tuple:
    """(gate, up, down) type sets of a flash file's bundle parts, from each layer's (gate, up, down)
    types: the row kernels (dot_row, axpy_down) then test one part's types, not the model's every type.
    With two types in a chain, each row paid ~15 ns for it (SmolLM2's Q4_1 up dot and Q8_0 down axpy,
    in cache, one thread: 70 -> 85 ns a row): LLVM compiles the row loop around both kernels.
    A fourth element says which column kinds of quant_cols.py the down parts use: (COLS_U4, COLS_I8),
    each 0 or None (flat, not nested in the down part's set: numba's parallel loops refused a tuple of
    tuples as an argument)."""
    lt = [tuple(int(t) for t in ts) for ts in layer_types]
    downs = {ts[2] for ts in lt}
    return (type_set({ts[0] for ts in lt}), type_set({ts[1] for ts in lt}), type_set(downs), cols_set(downs))


def cols_set(qtypes) -> tuple:
    """(COLS_U4, COLS_I8) each 0 when among qtypes, else None: the column kinds' "type set"."""
    have = {int(t) for t in qtypes}
    return tuple(0 if k in have else None for k in qc.COLS_TYPES)


def part_type_names(ptsets) -> list:
    """[gate names, up names, down names] of part_type_sets' result (the column kinds among the down's)."""
    return [type_names(ptsets[0]), type_names(ptsets[1]),
            type_names(ptsets[2]) + [qc.COLS_NAMES[k] for k, h in zip(qc.COLS_TYPES, ptsets[3]) if h is not None]]


ALL_TYPES = type_set(SUPPORTED)   # every type's kernels (tests and benchmarks of the kernels themselves)
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
              Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
              IQ4_NL: "IQ4_NL"}


def type_names(tset) -> list:
    """['Q4_1', 'Q8_0'] for a type set."""
    return [TYPE_NAMES[t] for t, have in zip(SUPPORTED, tset) if have is not None]


@njit(cache=True, inline="always")
def weight(blob, m):
    """(n_rows, row_bytes) uint8 view of the weight described by m = (offset, n_rows, row_bytes, qtype)."""
    return blob[m[0]:m[0] + m[1] * m[2]].reshape((m[1], m[2]))


@njit(cache=True)
def quantize_x(xq, x):
    """xq (q8x_scratch_bytes(n),) uint8 <- x (n,) as 8-bit blocks, once per input vector: the
    Q4/Q5/Q8 and Q2_K..Q6_K matvecs then use integer dot products (llama.cpp's scheme)."""
    qb.quantize_x_q8(xq, x)


# decode reads the input of these as 8-bit blocks (quantize_x)
Q8X = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)


@njit(cache=True, inline="always")
def uses_q8x(qt):
    """True for the types whose decode matvec/dot reads the input as 8-bit blocks (quantize_x)."""
    return qt in Q8X


# ---- the per-type tables -------------------------------------------------------------------------
# type -> kernel; each chain calls kernel(*args) with the args written per type (the Q8X types read xq).
# The row kernels of the 8-bit types are their LLVM-IR intrinsics (quant_basic._dq8x_*, _axpy_*),
# inlined: through their @njit wrappers each row paid a call with array arguments, 1.4x the whole dot
# (SmolLM2's Q4_1 gate rows: 144 -> 106 us for 1536 rows, one thread, the same values).

MATVEC = {F32: qb.matvec_f32, F16: qb.matvec_f16, BF16: qb.matvec_bf16, Q4_0: qb.matvec_q8x_q4_0,
          Q4_1: qb.matvec_q8x_q4_1, Q5_0: qb.matvec_q8x_q5_0, Q5_1: qb.matvec_q8x_q5_1,
          Q8_0: qb.matvec_q8x_q8_0, Q2_K: kq8.matvec_q8x_q2_k, Q3_K: kq8.matvec_q8x_q3_k,
          Q4_K: kq8.matvec_q8x_q4_k, Q5_K: kq8.matvec_q8x_q5_k, Q6_K: kq8.matvec_q8x_q6_k,
          IQ4_NL: qk.matvec_iq4_nl}
MATMAT = {F32: qb.matmat_f32, F16: qb.matmat_f16, BF16: qb.matmat_bf16, Q4_0: qb.matmat_q4_0,
          Q4_1: qb.matmat_q4_1, Q5_0: qb.matmat_q5_0, Q5_1: qb.matmat_q5_1, Q8_0: qb.matmat_q8_0,
          Q2_K: qk.matmat_q2_k, Q3_K: qk.matmat_q3_k, Q4_K: qk.matmat_q4_k, Q5_K: qk.matmat_q5_k,
          Q6_K: qk.matmat_q6_k, IQ4_NL: qk.matmat_iq4_nl}
DEQUANT = {F32: qb.dequant_row_f32, F16: qb.dequant_row_f16, BF16: qb.dequant_row_bf16,
           Q4_0: qb.dequant_row_q4_0, Q4_1: qb.dequant_row_q4_1, Q5_0: qb.dequant_row_q5_0,
           Q5_1: qb.dequant_row_q5_1, Q8_0: qb.dequant_row_q8_0, Q2_K: qk.dequant_row_q2_k,
           Q3_K: qk.dequant_row_q3_k, Q4_K: qk.dequant_row_q4_k, Q5_K: qk.dequant_row_q5_k,
           Q6_K: qk.dequant_row_q6_k, IQ4_NL: qk.dequant_row_iq4_nl}
DOT = {F32: qb.dot_f32, F16: qb.dot_f16, BF16: qb.dot_bf16, Q4_0: qb._dq8x_q4_0, Q4_1: qb._dq8x_q4_1,
       Q5_0: qb._dq8x_q5_0, Q5_1: qb._dq8x_q5_1, Q8_0: qb._dq8x_q8_0, Q2_K: kq8._dq8x_q2_k,
       Q3_K: kq8._dq8x_q3_k, Q4_K: kq8._dq8x_q4_k, Q5_K: kq8._dq8x_q5_k, Q6_K: kq8._dq8x_q6_k,
       IQ4_NL: qk.dot_iq4_nl}
AXPY = {F32: qb.axpy_f32, F16: qb.axpy_f16, BF16: qb.axpy_bf16, Q4_0: qb._axpy_q4_0, Q4_1: qb._axpy_q4_1,
        Q5_0: qb._axpy_q5_0, Q5_1: qb._axpy_q5_1, Q8_0: qb._axpy_q8_0, Q2_K: qk.axpy_q2_k, Q3_K: qk.axpy_q3_k,
        Q4_K: qk.axpy_q4_k, Q5_K: qk.axpy_q5_k, Q6_K: qk.axpy_q6_k, IQ4_NL: qk.axpy_iq4_nl}

_CHAINS: dict = {}


def _chain(table, params, args, args_q8x, otherwise, tset):
    """`if qt == T: return kernel_T(args)` for each type T of the type set (a numba tuple type), as a
    function numba compiles in place of the stub: the absent types' kernels are never typed, so never
    compiled. One generated function per (table, type set)."""
    present = tuple(t for t, ty in zip(SUPPORTED, tset.types) if not isinstance(ty, types.NoneType))
    key = (id(table), present)
    if key not in _CHAINS:
        lines = [f"def chain({params}):"]
        for t in present:
            lines += [f"    if qt == {t}:", f"        return k{t}({args_q8x if t in Q8X else args})"]
        lines.append(f"    {otherwise}")
        scope = {f"k{t}": table[t] for t in present}
        scope["np"] = np
        exec("\n".join(lines), scope)
        _CHAINS[key] = scope["chain"]
    return _CHAINS[key]


def _matvec_t(qt, out, w, x, xq, tset):
    raise NotImplementedError("numba only")


def _matmat_t(qt, out, w, x, tset):
    raise NotImplementedError("numba only")


def _dequant_t(qt, out, row, tset):
    raise NotImplementedError("numba only")


def _dot_t(qt, row, x, xq, tset):
    raise NotImplementedError("numba only")


def _axpy_t(qt, out, a, row, tset):
    raise NotImplementedError("numba only")


@overload(_matvec_t, inline="always")
def _ov_matvec(qt, out, w, x, xq, tset):
    return _chain(MATVEC, "qt, out, w, x, xq, tset", "out, w, x", "out, w, xq",
                  "raise ValueError('unsupported ggml type')", tset)


@overload(_matmat_t, inline="always")
def _ov_matmat(qt, out, w, x, tset):
    return _chain(MATMAT, "qt, out, w, x, tset", "out, w, x", "out, w, x",
                  "raise ValueError('unsupported ggml type')", tset)


@overload(_dequant_t, inline="always")
def _ov_dequant(qt, out, row, tset):
    return _chain(DEQUANT, "qt, out, row, tset", "out, row", "out, row",
                  "raise ValueError('unsupported ggml type')", tset)


@overload(_dot_t, inline="always")
def _ov_dot(qt, row, x, xq, tset):
    # no raise: an exception path inside a prange body stops numba from parallelizing the loop
    return _chain(DOT, "qt, row, x, xq, tset", "row, x", "row, xq, x.shape[0]",
                  "return np.float32(0.0)", tset)


@overload(_axpy_t, inline="always")
def _ov_axpy(qt, out, a, row, tset):
    return _chain(AXPY, "qt, out, a, row, tset", "out, a, row", "out, np.float32(a), row", "return None", tset)


def _axpy_down_t(qt, out, a, row, dtab, ia, dset, cols):
    raise NotImplementedError("numba only")


def _dequant_down_t(qt, out, row, dtab, ia, dset, cols):
    raise NotImplementedError("numba only")


_DOWN_CHAINS: dict = {}


def _down_chain(dequant, cols):
    """`if qt == COLS_U4: ...` for the column kinds present in cols, then the ggml types' chain of dset:
    generated like _chain, so a file without column down parts compiles none of their code."""
    have = tuple(k for k, ty in zip(qc.COLS_TYPES, cols.types) if not isinstance(ty, types.NoneType))
    key = (dequant, have)
    if key not in _DOWN_CHAINS:
        params = "qt, out, row, dtab, ia, dset, cols" if dequant else "qt, out, a, row, dtab, ia, dset, cols"
        lines = [f"def chain({params}):"]
        for k in have:
            lines += [f"    if qt == {k}:", "        b = dtab[2][ia]"]
            m = "dtab[1][b]" if dequant and qc.cols_has_min(k) else "dtab[0][b]"   # axpy: no min (above)
            a = "np.float32(1)" if dequant else "np.float32(a)"
            lines.append(f"        return k{k}(out, {a}, row, dtab[0][b], {m})")
        lines.append("    return fallback(qt, out, row, dset)" if dequant
                     else "    return fallback(qt, out, a, row, dset)")
        scope = {"np": np, "fallback": _dequant_t if dequant else _axpy_t}
        for k in have:
            scope[f"k{k}"] = qc.DEQUANT_IR[k] if dequant else qc.AXPY_IR[k]
        exec("\n".join(lines), scope)
        _DOWN_CHAINS[key] = scope["chain"]
    return _DOWN_CHAINS[key]


@overload(_axpy_down_t, inline="always")
def _ov_axpy_down(qt, out, a, row, dtab, ia, dset, cols):
    return _down_chain(False, cols)


def _axpy_down_pair_t(qt, out, a0, row0, a1, row1, dtab, ia, cols):
    raise NotImplementedError("numba only")


_PAIR_CHAINS: dict = {}


@overload(_axpy_down_pair_t, inline="always")
def _ov_axpy_down_pair(qt, out, a0, row0, a1, row1, dtab, ia, cols):
    """`if qt == COLS_U4: pair` for the column kinds in cols (generated like _down_chain: a file without
    column down parts compiles none of it)."""
    have = tuple(k for k, ty in zip(qc.COLS_TYPES, cols.types) if not isinstance(ty, types.NoneType))
    if have not in _PAIR_CHAINS:
        lines = ["def chain(qt, out, a0, row0, a1, row1, dtab, ia, cols):"]
        for k in have:
            lines += [f"    if qt == {k}:",
                      f"        return k{k}(out, np.float32(a0), row0, np.float32(a1), row1, dtab[0][dtab[2][ia]])"]
        lines.append("    return None")
        scope = {"np": np, **{f"k{k}": qc.PAIR_IR[k] for k in have}}
        exec("\n".join(lines), scope)
        _PAIR_CHAINS[have] = scope["chain"]
    return _PAIR_CHAINS[have]


@overload(_dequant_down_t, inline="always")
def _ov_dequant_down(qt, out, row, dtab, ia, dset, cols):
    return _down_chain(True, cols)


# ---- the entry points ----------------------------------------------------------------------------

@njit(cache=True)
def matvec(out, blob, m, x, xq, tset):
    """out (n_rows,) = W @ x; xq is x after quantize_x (used by the Q4/Q5/Q8 types)."""
    _matvec_t(m[3], out, weight(blob, m), x, xq, tset)


@njit(cache=True)
def matmat(out, blob, m, x, tset):
    """out (n_tok, n_rows) = X @ W.T for X (n_tok, n_cols)."""
    _matmat_t(m[3], out, weight(blob, m), x, tset)


@njit(cache=True)
def dequant_row(out, blob, m, r, tset):
    """out (n_cols,) = row r of the weight, dequantized (embedding lookup)."""
    _dequant_t(m[3], out, weight(blob, m)[r], tset)


# ---- one row at a time (the sparse FFN over bundle slots) ----------------------------------------
# The sparse FFN visits a few hundred rows per layer and token, each a dot of n_embd values; the type
# test costs a few compares per row, against hundreds of multiply-adds. No raise in these chains: an
# exception path inside a prange body stops numba from parallelizing the loop, so the types are
# checked once when a flash file is opened (runtime.FlashModel).

@njit(cache=True, inline="always")
def dot_row(qt, row, x, xq, tset):
    """row (row_bytes,) uint8 . x (n,) f32; xq is x after quantize_x (Q4/Q5/Q8 use it)."""
    return _dot_t(qt, row, x, xq, tset)


@njit(cache=True, inline="always")
def axpy_row(qt, out, a, row, tset):
    """out (n,) += a * dequant(row)."""
    _axpy_t(qt, out, a, row, tset)


@njit(cache=True, inline="always")
def axpy_down(qt, out, a, row, dtab, ia, dset, cols):
    """out (n,) += a * dequant(row) for the down part of stored row ia: a ggml type, or a column kind
    (quant_cols.py) whose scale rows come from dtab = (scale (n_blocks, n) f32, min (n_blocks, n) f32,
    block (n_ff,) int32 of each stored row). COLS_U4 adds a * scale * code only: the caller sums a per
    block and adds the mins once (quant_cols.add_block_mins). dset, cols: the down part's type set and
    column kinds (part_type_sets' third and fourth)."""
    _axpy_down_t(qt, out, a, row, dtab, ia, dset, cols)


@njit(cache=True, inline="always")
def axpy_down_pair(qt, out, a0, row0, a1, row1, dtab, ia, cols):
    """out (n,) += a0 * dequant(row0) + a1 * dequant(row1) for the down parts of stored rows ia and ia + 1
    when they are column parts (quant_cols.PAIR_IR) of one source block, as axpy_down does one (COLS_U4
    without the mins); nothing for a ggml type. The caller checked that the rows share a block (dtab[2])."""
    _axpy_down_pair_t(qt, out, a0, row0, a1, row1, dtab, ia, cols)


@njit(cache=True)
def dequant_down(qt, out, row, dtab, ia, dset, cols):
    """out (n,) f32 = the down part of stored row ia, decoded (the whole value: scale * code + min for
    COLS_U4). Not inlined: see dequant_into."""
    _dequant_down_t(qt, out, row, dtab, ia, dset, cols)


@njit(cache=True)
def dequant_rows(out, raw, qt, tset):
    """out (n, n_cols) f32 = the rows raw (n, row_bytes) uint8 of ggml type qt, decoded (the twin of
    gguf.quants.dequantize, 3-5x faster: the converter's passes over the output head). One thread: the
    type chain's raise keeps numba from splitting the loop."""
    for r in range(raw.shape[0]):
        _dequant_t(qt, out[r], raw[r], tset)


@njit(cache=True)
def dequant_into(qt, out, row, tset):
    """out (n,) f32 = dequant(row): one bundle part decoded once and used by a whole prompt chunk.
    Not inlined: the prompt kernels call it from several places, and every inlined copy of the type
    kernels is machine code resident under the cap."""
    _dequant_t(qt, out, row, tset)
