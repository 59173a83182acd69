"""Column down parts (`convert --down-type source`, kernels/quant_cols.py, flash/down_cols.py): the
kernels against their numpy twin, the converter's columns against gguf.quants' dequantization of the
source, and the runtime on such a file: dense mode closer to the source than re-quantized columns, the
same logits under a cap as without one."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

import gguf_flash
from gguf_flash.config import config_from_gguf
from gguf_flash.errors import FlashFormatError
from gguf_flash.flash.down_cols import block_scales, down_part_type
from gguf_flash.flash.format import read_flash
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.kernels import quant_cols as qc


@pytest.mark.parametrize("kind", qc.COLS_TYPES)
def test_kernels_equal_their_numpy_twin(kind):
    """Each kind's decode and its axpy as the decode step calls it (COLS_U4: the centred codes, without
    the min, which add_block_mins adds: the test below) against decode_cols."""
    rng = np.random.default_rng(3)
    n = 96
    row = rng.integers(0, 256, qc.cols_bytes(kind, n), dtype=np.uint8)
    s = rng.standard_normal(n).astype(np.float16).view(np.uint16)   # the tables: float16 bits
    m = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    want = qc.decode_cols(kind, row, s, m if kind == qc.COLS_U4 else None)
    got = np.zeros(n, np.float32)
    out = rng.standard_normal(n).astype(np.float32)
    before = out.copy()
    if kind == qc.COLS_U4:
        qc.dequant_cols_u4(got, row, s, m)
        qc.axpy_cols_u4_centred(out, 0.75, row, s)
        added = qc.decode_cols(kind, row, s, -8 * s.view(np.float16).astype(np.float32))   # s * (code - 8)
    else:
        qc.dequant_cols_i8(got, row, s)
        qc.axpy_cols_i8(out, 0.75, row, s)
        added = want
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, before + np.float32(0.75) * added, rtol=1e-5, atol=1e-5)
    # the nibble order is ggml's: byte j holds value j (low) and j + 16 (high) of each 32
    if kind == qc.COLS_U4:
        one = np.zeros(16, np.uint8)
        one[2] = 0x51
        v = qc.decode_cols(kind, one, np.ones(32, np.float16), np.zeros(32, np.float16))
        assert v[2] == 1 and v[18] == 5 and v.sum() == 6


def test_centred_axpy_and_block_mins_add_up_to_the_columns():
    """The decode step's split (kernels/quant_cols.py): each row's h * scale * (code - 8) and, once per
    source block, (sum of its rows' h) * (min + 8 scale), against numpy's sum of h * column."""
    rng = np.random.default_rng(11)
    n, n_blocks, rows = 64, 4, 40
    scale = rng.standard_normal((n_blocks, n)).astype(np.float16).view(np.uint16)
    dmin = rng.standard_normal((n_blocks, n)).astype(np.float16).view(np.uint16)
    codes = rng.integers(0, 256, (rows, qc.cols_bytes(qc.COLS_U4, n)), dtype=np.uint8)
    block = rng.integers(0, n_blocks, rows)
    h = rng.standard_normal(rows).astype(np.float32)
    out = np.zeros(n, np.float32)
    hsum = np.zeros((2, n_blocks), np.float32)
    want = np.zeros(n, np.float64)
    for r in range(rows):
        qc.axpy_cols_u4_centred(out, h[r], codes[r], scale[block[r]])
        hsum[r % 2, block[r]] += h[r]
        want += h[r] * qc.decode_cols(qc.COLS_U4, codes[r], scale[block[r]], dmin[block[r]])
    qc.add_block_mins(out, scale, dmin, hsum)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _tiny(tmp_path, qtype):
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / f"t-{qtype}.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, qtype=qtype, seed=5)
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    return src, calib


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_block_scales_give_the_source_values(qtype):
    """scale * code + min of each 32-value block, with integer codes in the kind's range, is
    gguf.quants.dequantize of the rows exactly (the column form of each source type, on random rows);
    Q5_1 has none (re-quantized Q8_0)."""
    rng = np.random.default_rng(7)
    raw = quants.quantize(rng.standard_normal((8, 256)).astype(np.float32), T[qtype])
    v = quants.dequantize(raw, T[qtype])
    s, m = block_scales(raw, T[qtype])
    S, M = np.repeat(s, 32, axis=1), np.repeat(m, 32, axis=1)
    c = np.rint((v - M) / np.where(S != 0, S, 1))
    lo, hi = (0, 15) if down_part_type(T[qtype], "source") == qc.COLS_U4 else (-128, 127)
    assert lo <= c.min() and c.max() <= hi
    assert np.array_equal(S * c.astype(np.float32) + M, v)
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)    # float16 tables lose nothing
    assert down_part_type(T.Q5_1, "source") == T.Q8_0 and down_part_type(T.Q4_1, "Q5_0") == T.Q5_0


@pytest.mark.parametrize("qtype,kind", [("Q4_1", qc.COLS_U4), ("Q8_0", qc.COLS_I8)])
def test_source_columns_decode_to_the_source_values(tmp_path, qtype, kind):
    """Every stored row's down part, decoded with its layer's tables, is the source's column exactly
    (gguf.quants.dequantize of ffn_down). In dense mode such a file's logits are closer to the source's
    than with re-quantized Q8_0 columns."""
    src, calib = _tiny(tmp_path, qtype)
    out = tmp_path / "src.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type="source")
    f, sf = GGUFFile(out), GGUFFile(src)
    info = read_flash(f, config_from_gguf(f))
    n_embd = 64
    for il, l in enumerate(info.layers):
        assert l.types[2] == kind == down_part_type(T[qtype], "source")
        rows = np.asarray(f.raw(f"blk.{il}.ffn_bundle")).reshape(len(l.neuron_id), -1)[:, sum(l.part_bytes[:2]):]
        cols = quants.dequantize(sf.raw(f"blk.{il}.ffn_down.weight"), T[qtype]).T[l.neuron_id]
        if kind not in qc.COLS_TYPES:
            assert l.down_scale is None and f"blk.{il}.ffn_down_scale" not in f.tensors
            continue
        assert l.down_scale.shape == (128 // 32, n_embd)
        assert (l.down_min is not None) == (kind == qc.COLS_U4)
        for i, nid in enumerate(l.neuron_id):
            b = nid // 32
            got = qc.decode_cols(kind, rows[i], l.down_scale[b], None if l.down_min is None else l.down_min[b])
            assert np.array_equal(got, cols[i]), (il, i)
    if kind in qc.COLS_TYPES:
        requant = tmp_path / "q8.flash.gguf"
        gguf_flash.convert(src, requant, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type="Q8_0")
        toks = [5, 17, 99, 200, 3, 42]
        dense = gguf_flash.load(src, n_ctx=64)
        ref = np.array([dense.model.forward(t, p).copy() for p, t in enumerate(toks)])
        drift = {}
        for name, p in (("source", out), ("Q8_0", requant)):
            m = gguf_flash.load(p, mode="dense", n_ctx=64)
            drift[name] = np.abs(np.array([m.model.forward(t, p).copy() for p, t in enumerate(toks)]) - ref).max()
        assert drift["source"] <= drift["Q8_0"], drift


def test_window_size_never_changes_the_logits_with_source_columns(tmp_path):
    """The same prompt and decode steps with every window whole and with a window of one slot a layer
    (what a tight cap leaves): the rows streamed through the staging buffer and those held use the same
    tables and per-block sums of the mins (bitwise the same logits), for each selector. SmolLM2's
    default conversion (tests/conftest.py) runs the same paths on the real model in test_flash_runtime.py
    and test_flash_prefill.py."""
    src, calib = _tiny(tmp_path, "Q4_1")
    out = tmp_path / "src.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type="source")
    toks = [5, 17, 99, 200, 3, 42, 7, 8]
    for selector in ("bundle", "gate", "product"):
        outs = {}
        for name in ("whole", "one slot"):
            llm = gguf_flash.load(out, n_ctx=64, selector=selector)
            if name == "one slot":
                for w in llm.model.windows:
                    w.shrink(1)
            got = [llm.model.prefill(toks[:4], 0).copy()]
            got += [llm.model.forward(t, 4 + i).copy() for i, t in enumerate(toks[4:])]
            outs[name] = np.array(got)
            assert (min(s.overflow for s in llm.model.stats) > 0) == (name == "one slot")
        np.testing.assert_array_equal(outs["whole"], outs["one slot"], err_msg=selector)


def test_q4_k_blocks_give_the_source_values(gemma3_path):
    """Gemma 3's Q4_K ffn_down rows: scale * code + min of each 32-value sub-block, codes 0..15, equal
    gguf.quants.dequantize exactly (the table form of a K-quant); with the tables in float16, within
    a Q8_0 re-quantization's worst error."""
    f = GGUFFile(gemma3_path)
    name = next(n for n, t in f.tensors.items() if n.endswith("ffn_down.weight") and t.qtype == T.Q4_K)
    raw = np.asarray(f.raw(name))[:16]
    v = quants.dequantize(raw, T.Q4_K)
    s, m = block_scales(raw, T.Q4_K)
    S, M = np.repeat(s, 32, axis=1), np.repeat(m, 32, axis=1)
    c = np.rint((v - M) / np.where(S != 0, S, 1))
    assert c.min() >= 0 and c.max() <= 15
    assert np.array_equal(S * c.astype(np.float32) + M, v)
    # the float16 tables round d x sub-scale and dmin x sub-min: each value stays within Q8_0's own bound
    # (half a step: 1/254 of the block's largest), the re-quantized column's error
    S16 = S.astype(np.float16).astype(np.float32)
    M16 = M.astype(np.float16).astype(np.float32)
    err = np.abs(S16 * c + M16 - v).reshape(len(v), -1, 32).max(axis=2)
    big = np.abs(v).reshape(len(v), -1, 32).max(axis=2)
    assert (err <= big / 254).all()


@pytest.mark.parametrize("qtype,down_type,drop,add,match", [
    ("Q4_1", "source", "blk.1.ffn_down_scale", None, "cols-u4 down parts but no tensor blk.1.ffn_down_scale"),
    ("Q8_0", "source", None, "blk.1.ffn_down_min", "has blk.1.ffn_down_min, which cols-i8 does not use"),
    ("Q8_0", "Q8_0", None, "blk.1.ffn_down_scale", "has blk.1.ffn_down_scale but its down parts are Q8_0")])
def test_missing_or_stray_tables_are_refused(tmp_path, qtype, down_type, drop, add, match):
    """A file whose column down parts lack their scale table, a min table on a kind without one, or a
    table on a layer of ggml-typed down parts is refused with a FlashFormatError naming the file (a GGUF
    rewritten without / with the tensor: tests/fuzz_gguf.rewrite)."""
    from fuzz_gguf import rewrite
    src, calib = _tiny(tmp_path, qtype)
    out = tmp_path / "t.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type=down_type)
    table = np.zeros((128 // 32, 64), np.float16)
    bad = rewrite(out, tmp_path / "bad.flash.gguf", drop=(drop,) if drop else (),
                  tensors={add: (table, None)} if add else None)
    with pytest.raises(FlashFormatError, match=f"bad.flash.gguf.*{match}"):
        gguf_flash.load(bad, n_ctx=64)
