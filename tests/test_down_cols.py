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
from gguf_flash.flash.down_cols import block_scales, down_part_type, stored_order
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


@pytest.mark.parametrize("kind", [qc.COLS_U4, qc.COLS_I8])
def test_pair_axpy_adds_both_rows(kind):
    """Two rows of one source block in one pass (the decode step's pairs): scale x (h0 x code0 + h1 x
    code1), centred codes for COLS_U4, against numpy's sum of the two rows' decoded columns without the
    min (what add_block_mins adds)."""
    rng = np.random.default_rng(12)
    n = 64
    scale = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    rows = rng.integers(0, 256, (2, qc.cols_bytes(kind, n)), dtype=np.uint8)
    h = rng.standard_normal(2).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    out = base.copy()
    pair = qc.axpy_cols_u4_pair if kind == qc.COLS_U4 else qc.axpy_cols_i8_pair
    pair(out, h[0], rows[0], h[1], rows[1], scale)
    centre = 8 * qc._as_f32(scale) if kind == qc.COLS_U4 else 0
    zero = np.zeros(n, np.uint16) if kind == qc.COLS_U4 else None
    want = base.astype(np.float64) + sum(
        h[k] * (qc.decode_cols(kind, rows[k], scale, zero) - centre) for k in range(2))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_stored_order_pairs_the_rows_of_a_source_block():
    """Column down parts: stored rows 2p and 2p + 1 come from one source block of 32 neurons, the pairs
    hot-first by their summed frequency, each block's hottest neuron paired with its second; ggml down
    parts keep the plain hot-first order."""
    rng = np.random.default_rng(13)
    freq = rng.random(256).astype(np.float32)
    assert np.array_equal(stored_order(freq, int(T.Q8_0)), np.argsort(-freq, kind="stable"))
    order = stored_order(freq, qc.COLS_U4)
    assert np.array_equal(np.sort(order), np.arange(256))
    pairs = order.reshape(-1, 2)
    assert np.all(pairs[:, 0] // 32 == pairs[:, 1] // 32)
    assert np.all(freq[pairs[:, 0]] >= freq[pairs[:, 1]])
    assert np.all(np.diff(freq[pairs].astype(np.float64).sum(axis=1)) <= 0)
    for b in range(8):   # within a block: ranks (0, 1), (2, 3), ...
        mine = pairs[pairs[:, 0] // 32 == b]
        ranks = np.argsort(np.argsort(-freq[b * 32:(b + 1) * 32], kind="stable"))
        assert sorted(tuple(ranks[p - b * 32]) for p in mine) == [(2 * i, 2 * i + 1) for i in range(16)]


def test_sparse_ffn_with_pairs_adds_every_chosen_row_once():
    """The decode step's down parts over chosen rows with pairs (kernels/sparse.sparse_ffn_range, the
    gate values known: each row's h = act(gate) x its up dot, computed a group of rows at a time): pairs
    inside a group, across a group's end (the second row's h is the next group's), across the two
    threads' parts, with one or both h zero, and single rows, in one call and cut into two calls (at a
    position no pair spans): the parts' sums plus the block mins equal numpy's sum of h x column."""
    from gguf_flash.kernels import dispatch, sparse
    from gguf_flash.kernels.quant_basic import q8x_scratch_bytes
    from gguf_flash.model import thread_rows
    rng = np.random.default_rng(14)
    n, n_ff, nb = 64, 96, 3
    up = rng.standard_normal((n_ff, n)).astype(np.float32)
    down = rng.integers(0, 256, (n_ff, qc.cols_bytes(qc.COLS_U4, n)), dtype=np.uint8)
    rows = np.concatenate([up.view(np.uint8), down], axis=1)    # F32 up part | COLS_U4 down part
    block = ((np.arange(n_ff) // 2) % nb).astype(np.int32)      # stored rows 2p, 2p + 1 share a block
    dtab = (rng.standard_normal((nb, n)).astype(np.float16).view(np.uint16),
            rng.standard_normal((nb, n)).astype(np.float16).view(np.uint16), block)
    active = np.sort(rng.choice(n_ff, 70, replace=False)).astype(np.int32)
    gate = rng.standard_normal(len(active)).astype(np.float32)
    gate[rng.choice(len(active), 12, replace=False)] = 0.0     # h = 0 for these rows
    pairs = [j for j in range(len(active) - 1) if sparse._pair_at(active, j, block)]
    assert len(pairs) >= 15 and any(j % sparse.H_GROUP == sparse.H_GROUP - 1 for j in pairs)
    types = np.array([int(T.F32), int(T.F32), qc.COLS_U4], np.int64)
    ptsets = dispatch.part_type_sets([types])
    offs = np.array([0, 0, 4 * n, rows.shape[1]], np.int64)
    ns, stage = np.arange(n_ff, dtype=np.int32), np.zeros((1, rows.shape[1]), np.uint8)
    x = rng.standard_normal(n).astype(np.float32)
    xq = np.zeros(q8x_scratch_bytes(n), np.uint8)
    dispatch.quantize_x(xq, x)
    h = gate.astype(np.float64) * (up[active].astype(np.float64) @ x)
    want = sum(h[j] * qc.decode_cols(qc.COLS_U4, down[a], dtab[0][block[a]], dtab[1][block[a]]).astype(np.float64)
               for j, a in enumerate(active))
    cut = next(j for j in range(20, 40) if not sparse._pair_at(active, j - 1, block))
    got = []
    for ranges in ([(0, len(active))], [(0, cut), (cut, len(active))]):
        partial, hsum = thread_rows(2, n), thread_rows(2, nb)
        g = gate.copy()
        for j0, j1 in ranges:
            sparse.sparse_ffn_range(partial, hsum, rows, ns, stage, ns, active, len(active), j0, j1, g,
                                    sparse.KNOWN_GATE, x, xq, types, offs, dtab, 0, np.float32(-1), ptsets)
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
        out = np.zeros(n, np.float32)
        sparse.sum_partials(out, partial)
        qc.add_block_mins(out, dtab[0], dtab[1], hsum)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        got.append(out)
    np.testing.assert_array_equal(got[0], got[1])


def test_pair_cut_never_ends_a_call_between_the_rows_of_a_pair():
    """The overflow chunks (flash/ffn.pair_cut): a chunk whose last row's pair is the next chunk's first
    gives that row to the next chunk; one whose pair is held in the window takes it along; the last chunk
    runs to the end; without column parts (block None) the cut is where the chunk ends."""
    from gguf_flash.flash.ffn import pair_cut
    active = np.array([0, 1, 2, 3, 6, 7, 9, 10, 11], np.int32)
    block = np.zeros(12, np.int32)
    block[10:] = 1                   # rows 10, 11: a pair of another block; 8, 9 would pair in block 0
    ovf = np.array([1, 2, 3, 4, 6, 7, 8], np.int32)   # positions; 0 and 5 (rows 0 and 7) in the window
    no, n = len(ovf), len(active)
    assert pair_cut(active, n, ovf, 0, 2, no, block) == (1, 2)   # rows 1, 2: 2 pairs with 3, next chunk's
    assert pair_cut(active, n, ovf, 1, 3, no, block) == (3, 6)   # rows 2, 3, 6: 6's pair 7 is in the window
    assert pair_cut(active, n, ovf, 0, 4, no, block) == (4, 6)   # ... ending at position 4 the same
    assert pair_cut(active, n, ovf, 4, 1, no, block) == (1, 7)   # row 9: odd, no pair
    assert pair_cut(active, n, ovf, 4, 2, no, block) == (1, 7)   # rows 9, 10: 10 pairs with the next's 11
    assert pair_cut(active, n, ovf, 5, 1, no, block) == (1, 8)   # ... but a one-row chunk cannot give it
    assert pair_cut(active, n, ovf, 5, 2, no, block) == (2, n)   # the last chunk runs to n
    assert pair_cut(active, n, ovf, 0, 2, no, None) == (2, 3)


def _tiny(tmp_path, qtype):
    """A 2-layer synthetic llama whose layers are qtype and its embedding Q8_0 (SmolLM2's mix for Q4_1:
    the same type sets as the real model's tests, so the suite compiles their kernels once), and a
    calibration text."""
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / f"t-{qtype}.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, qtype=qtype, embd_qtype="Q8_0", seed=5)
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


def test_window_size_never_changes_the_logits_with_source_columns(tmp_path, monkeypatch):
    """The same prompt and decode steps with every window whole, with a window of one slot a layer
    (what a tight cap leaves), and with five slots and a staging buffer of a few rows (the overflow
    streamed in many chunks, pairs of rows split between window and staging and at chunk ends:
    ffn.pair_cut): the rows streamed and those held use the same tables, per-block sums of the mins and
    pairs (bitwise the same logits), for each selector. SmolLM2's default conversion (tests/conftest.py)
    runs the same paths on the real model in test_flash_runtime.py and test_flash_prefill.py."""
    from gguf_flash.flash import sizing
    src, calib = _tiny(tmp_path, "Q4_1")
    out = tmp_path / "src.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type="source")
    toks = [5, 17, 99, 200, 3, 42, 7, 8]
    bundle = read_flash(GGUFFile(out), config_from_gguf(GGUFFile(out))).layers[0].bundle_bytes
    for selector in ("bundle", "gate", "product"):
        outs = {}
        for name in ("whole", "one slot", "few rows staged"):
            with monkeypatch.context() as mp:
                if name == "few rows staged":   # 3 bundles: 4 and 10 rows of the gate and product slots
                    mp.setattr(sizing, "STAGING_BYTES", 3 * bundle)
                    mp.setattr(sizing, "STAGING_MAX_BYTES", 3 * bundle)
                llm = gguf_flash.load(out, n_ctx=64, selector=selector)
            if name == "few rows staged":
                assert llm.model.ffn.staging.shape[0] * llm.model.ffn.staging.shape[1] <= 3 * bundle
            if name != "whole":
                for w in llm.model.windows:
                    w.shrink(1 if name == "one slot" else 5)
            got = [llm.model.prefill(toks[:4], 0).copy()]
            got += [llm.model.forward(t, 4 + i).copy() for i, t in enumerate(toks[4:])]
            outs[name] = np.array(got)
            assert (min(s.overflow for s in llm.model.stats) > 0) == (name != "whole")
        for name in ("one slot", "few rows staged"):
            np.testing.assert_array_equal(outs["whole"], outs[name], err_msg=f"{selector}, {name}")


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
