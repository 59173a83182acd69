"""The converter's column down parts (`convert --down-type source`; kernels/quant_cols.py, docs/flash-gguf.md):
each neuron's column of W_down as the source's own codes, the blocks' scales and offsets in two tables.

For a source block of 32 columns b in row r (Q4_K: a 32-value sub-block of its 256), every value is
scale * code + min with an integer code; the block's (scale, min) go to table[b, r], the codes to the
neurons' own bytes. The values a column decodes to are the source's own (the dequantization's same float
operations: tests/test_down_cols.py checks them against gguf.quants; Q4_K's table entries are rounded to
float16), where a re-quantized Q8_0 column rounds each a second time. Types without such a form (Q6_K's 16-value sub-blocks, Q5_1, Q5_K,
IQ4_NL's codebook, floats) keep the re-quantized Q8_0 column.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ..errors import InvalidArgumentError
from ..kernels.quant_cols import COLS_BLOCK, COLS_I8, COLS_U4, COLS_NAMES, cols_bytes, cols_has_min
from .convert_stats import dequant_rows

# source ggml type of ffn_down -> the column kind its codes fit
SOURCE_KIND = {Q.Q4_0: COLS_U4, Q.Q4_1: COLS_U4, Q.Q4_K: COLS_U4, Q.Q8_0: COLS_I8, Q.Q5_0: COLS_I8}
FALLBACK = Q.Q8_0      # the re-quantized column of the other types


def down_part_type(src_qtype: int, down_type: str) -> int:
    """The down part's type id for a layer whose ffn_down is src_qtype: `--down-type source` gives the
    column kind of SOURCE_KIND (else FALLBACK), any other --down-type that ggml type."""
    if down_type == "source":
        return int(SOURCE_KIND.get(Q(src_qtype), FALLBACK))
    return int(Q[down_type])


def stored_order(freq: np.ndarray, kind: int) -> np.ndarray:
    """(n_ff,) the neurons in stored order: hot-first (decreasing calibration frequency freq); for column
    down parts (kind in COLS_TYPES) hot-first in pairs of one source block, so that the decode step adds
    two rows sharing a row of the tables in one pass (sparse._pair_at): each block's 32 neurons are
    paired hottest with second hottest, third with fourth, ..., and the pairs ordered by their summed
    frequency (ties: the lower neuron first). Within a block neighbours in frequency are ~1/32 of the
    range apart, so the order is nearly the plain one (tests/test_down_cols.py)."""
    if kind not in (COLS_U4, COLS_I8):
        return np.argsort(-freq, kind="stable")
    n_blocks = len(freq) // COLS_BLOCK
    within = np.argsort(-freq.reshape(n_blocks, COLS_BLOCK), axis=1, kind="stable")
    pairs = (within + np.arange(0, len(freq), COLS_BLOCK)[:, None]).reshape(-1, 2)   # (n_ff / 2, 2)
    key = freq[pairs].astype(np.float64).sum(axis=1)
    return pairs[np.lexsort((pairs[:, 0], -key))].reshape(-1)


def _f16(raw, off):
    return raw[:, off:off + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def block_scales(raw: np.ndarray, qtype: int) -> tuple:
    """(scale, min) (n_rows, n_cols / 32) f32 of each 32-value block of the rows raw (n_rows, row_bytes)
    uint8 of type qtype (SOURCE_KIND): value = scale * code + min, code an integer (unsigned for the
    COLS_U4 sources; for COLS_I8 min is 0 and the code signed)."""
    qtype = Q(qtype)
    n_rows = raw.shape[0]
    if qtype == Q.Q4_K:
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])             # (n_rows * n_super, 144)
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:4 + quants.Q4_K.K_SCALE_SIZE])   # (n_blocks, 8)
        scale = d[:, None] * sc.astype(np.float32)
        dmn = -(dmin[:, None] * m.astype(np.float32))
        return scale.reshape(n_rows, -1), dmn.reshape(n_rows, -1)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])              # Q4_0, Q4_1, Q8_0, Q5_0: d first
    d = _f16(blocks, 0)
    if qtype == Q.Q4_1:
        m = _f16(blocks, 2)
    elif qtype == Q.Q4_0:
        m = -8.0 * d
    else:
        m = np.zeros_like(d)          # Q8_0; Q5_0's codes are signed (q - 16)
    return d.reshape(n_rows, -1), m.reshape(n_rows, -1)


def column_parts(f, il: int, order: np.ndarray, kind: int, n_embd: int, n_ff: int,
                 row_block: int = 128) -> tuple:
    """Layer il's down parts as columns of the given kind: (codes (n_ff, part bytes) uint8 in stored row
    order `order`, scale (n_ff / 32, n_embd) f16, min (n_ff / 32, n_embd) f16 or None). Raises
    InvalidArgumentError if a value is not scale * code + min exactly in float32 (a source this module
    misreads). The tables are float16 (quant_cols.py): exact for the types whose blocks store d and m as
    float16; Q4_K's d x sub-scale and dmin x sub-min are rounded to it."""
    name = f"blk.{il}.ffn_down.weight"
    info = f.tensor(name)
    raw = f.raw(name)                                        # (n_embd, row_bytes): row r = output r
    codes = np.empty((n_ff, n_embd), np.int16)               # (stored row, output r)
    scale = np.empty((n_ff // COLS_BLOCK, n_embd), np.float32)
    dmin = np.empty((n_ff // COLS_BLOCK, n_embd), np.float32)
    for r0 in range(0, n_embd, row_block):
        r1 = min(n_embd, r0 + row_block)
        v = dequant_rows(f, name, r0, r1)                    # (rows, n_ff) the source's values
        s, m = block_scales(np.asarray(raw[r0:r1]), info.qtype)   # (rows, n_ff / 32)
        S, M = np.repeat(s, COLS_BLOCK, axis=1), np.repeat(m, COLS_BLOCK, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(S != 0, np.rint((v - M) / np.where(S != 0, S, 1)), 0.0)
        if not np.array_equal(S * c.astype(np.float32) + M, v):
            raise InvalidArgumentError(f"{f.path}: {name} rows {r0}..{r1}: a value is not scale * code + min "
                                       f"of its block ({Q(info.qtype).name}); use --down-type Q8_0")
        codes[:, r0:r1] = c.T[order].astype(np.int16)
        scale[:, r0:r1] = s.T
        dmin[:, r0:r1] = m.T
        f.release_tensor(name)
    lo, hi = (0, 15) if kind == COLS_U4 else (-128, 127)
    if codes.min() < lo or codes.max() > hi:
        raise InvalidArgumentError(f"{f.path}: {name}: codes outside {lo}..{hi} for {COLS_NAMES[kind]}")
    if kind == COLS_U4:
        q = codes.astype(np.uint8).reshape(n_ff, n_embd // 32, 2, 16)
        out = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n_ff, n_embd // 2)
    else:
        out = codes.astype(np.int8).view(np.uint8)
    assert out.shape[1] == cols_bytes(kind, n_embd)
    return (np.ascontiguousarray(out), scale.astype(np.float16),
            dmin.astype(np.float16) if cols_has_min(kind) else None)
