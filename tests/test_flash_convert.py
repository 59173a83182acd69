"""The converter: the flash-GGUF format, identity with the source model, predictors, bad input."""

import os

import gguf
import numpy as np
import pytest

import gguf_flash
from gguf_flash.errors import GGUFFormatError, InvalidArgumentError, UnsupportedModelError
from gguf_flash.flash import format as ff
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.kernels.quant_cols import COLS_U4


def test_flash_file_is_a_valid_gguf(smollm2_flash, smollm2_path):
    path, report = smollm2_flash
    r = gguf.GGUFReader(path)                       # the gguf package opens it
    names = {t.name for t in r.tensors}
    assert "blk.0.ffn_gate.weight" not in names and "blk.0.ffn_bundle" in names
    f, src = GGUFFile(path), GGUFFile(smollm2_path)
    assert f.alignment == ff.ALIGNMENT
    order = np.asarray(f.array(ff.T_HI_ORDER))      # the head's rows (tied: token_embd) in the index's order
    for name, info in src.tensors.items():          # every non-FFN tensor copied byte for byte
        if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
            continue
        want = src.raw(name)[order] if name == "token_embd.weight" else src.raw(name)
        assert np.array_equal(f.raw(name), want), name
    for key in src.meta:                            # every key of the source
        if key != "general.alignment":
            assert key in f.meta, key
    cfg = gguf_flash.load(path, mode="dense").cfg
    info = ff.read_flash(f, cfg)
    assert info.source_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    l0 = info.layers[0]
    # Q4_1 gate and up rows, the Q4_1 down column in its own 4-bit codes (docs/flash-gguf.md)
    assert l0.bundle_offset % 4096 == 0 and l0.part_bytes == (360, 360, 288) and l0.types[2] == COLS_U4
    # hot-first in pairs of one source block (down_cols.stored_order): stored rows 2p, 2p + 1
    pairs = np.asarray(l0.neuron_id).reshape(-1, 2)
    assert np.all(pairs[:, 0] // 32 == pairs[:, 1] // 32)
    assert np.all(np.diff(np.asarray(l0.freq, np.float64).reshape(-1, 2).sum(axis=1)) <= 0)
    # gate and up rows byte for byte, in the stored (hot-first) order
    bundle = f.raw(ff.t_bundle(0)).reshape(cfg.n_ff, -1)
    gate = src.raw("blk.0.ffn_gate.weight")
    assert np.array_equal(bundle[:, :360], gate[l0.neuron_id])


def test_every_neuron_active_reproduces_the_source(smollm2_flash, smollm2_llm, smollm2_ref):
    """Dense mode on the flash file = the source model (its down columns are the source's own values;
    the down projection takes float activations where the source's matvec rounds them to 8 bits): the
    next-token distributions agree (KL < 0.1 nats, the bound the dense decode path meets against the
    batch path) and llama.cpp's teacher-forced check passes."""
    from gguf_flash.sampling import log_softmax
    path, _ = smollm2_flash
    llm = gguf_flash.load(path, mode="dense", n_ctx=128)
    for p in smollm2_ref["prompts"][:2]:
        prompt, greedy = p["tokens_add_special"], p["greedy_ids"]
        ids = prompt + greedy[:-1]
        ref = smollm2_llm.logits(ids, all_positions=True)
        for pos, tok in enumerate(ids):
            got = llm.model.forward(tok, pos)
            a, b = log_softmax(ref[pos]), log_softmax(got)
            assert float((np.exp(a) * (a - b)).sum()) < 0.1, (p["id"], pos)
            i = pos - (len(prompt) - 1)
            if i >= 0 and p["greedy_top1_top2_margin"][i] >= 0.5:
                assert int(np.argmax(got)) == greedy[i], (p["id"], i)


def test_recorded_predictor_recall_matches_held_out(smollm2_flash, smollm2_path):
    """Recompute the held-out FFN inputs (calibration is deterministic) and evaluate the stored
    (float16) predictors: recall and precision match the recorded figures."""
    from gguf_flash.flash.calibrate import calibrate, default_calibration_text
    from gguf_flash.flash.convert_stats import dequant
    from gguf_flash.flash.predictor import active_mask
    from gguf_flash.model import Model
    from gguf_flash.tokenizer import tokenizer_from_gguf
    path, report = smollm2_flash
    src = GGUFFile(smollm2_path)
    model = Model(src, n_ctx=512)
    cal = calibrate(model, tokenizer_from_gguf(src), default_calibration_text()[0], 1024, 512)
    f = GGUFFile(path)
    info = ff.read_flash(f, model.cfg)
    for il in (0, 15, 29):
        l = info.layers[il]
        X = cal.held_out(il)
        Wg = dequant(src, f"blk.{il}.ffn_gate.weight")[l.neuron_id]      # stored order
        Y = active_mask(X, Wg, l.threshold, "silu")
        z = (X @ l.pred_a) @ l.pred_b + l.pred_bias
        P = (np.abs(z) - l.pred_offset > 0) if l.pred_abs else z > 0
        recall = (P & Y).sum() / Y.sum()
        precision = (P & Y).sum() / P.sum()
        assert abs(recall - l.recall) < 0.01 and abs(precision - l.precision) < 0.01, il
        assert abs(1 - Y.mean() - report.layer_sparsity[il]) < 1e-6


def test_refuses_bad_input(tmp_path, smollm2_flash, tiny_llama_path):
    out = tmp_path / "out.flash.gguf"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(GGUFFormatError):
        gguf_flash.convert(bad, out)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama_path.read_bytes()[:5000])
    with pytest.raises(GGUFFormatError, match="truncated"):
        gguf_flash.convert(cut, out)
    with pytest.raises(InvalidArgumentError, match="already a flash GGUF"):
        gguf_flash.convert(smollm2_flash[0], out)
    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        gguf_flash.convert(tmp_path / "mamba.gguf", out)
    out.write_bytes(b"keep me")
    with pytest.raises(InvalidArgumentError, match="--force"):
        gguf_flash.convert(tiny_llama_path, out)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("where", ["calibration", "write"])
def test_interrupted_conversion_leaves_nothing(tmp_path, tiny_llama_path, monkeypatch, where):
    """Ctrl-C while calibrating (the FFN inputs spilled to a file in OUT's directory) or while writing:
    nothing at OUT, nothing left beside it."""
    from gguf_flash.flash import convert as conv, convert_stats, convert_write
    calls = []
    target, name = (convert_stats.SparsityStats, "add") if where == "calibration" else (convert_write, "_bundle")
    real = getattr(target, name)

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, name, boom)
    out = tmp_path / "x.flash.gguf"
    with pytest.raises(KeyboardInterrupt):
        conv.convert(tiny_llama_path, out, calib_tokens=1024, sparsity=0.5, rank=8,
                     calib=_calib_file(tmp_path))
    assert not out.exists() and os.listdir(tmp_path) == ["calib.txt"] and len(calls) == 2


def test_max_ram_below_the_floor_is_refused_before_reading_the_model(tmp_path, tiny_llama_path, monkeypatch):
    import subprocess
    import sys
    from gguf_flash.flash import convert as conv

    def no(*a, **k):
        raise AssertionError("the model was read")

    monkeypatch.setattr(conv, "Model", no)
    monkeypatch.setattr(conv, "_compile_out_of_process", no)
    out = tmp_path / "x.flash.gguf"
    with pytest.raises(InvalidArgumentError, match=r"--max-ram 100 MiB is below this conversion's floor of \d+ MiB"):
        conv.convert(tiny_llama_path, out, max_ram="100M")
    with pytest.raises(InvalidArgumentError, match="bad size"):
        conv.convert(tiny_llama_path, out, max_ram="lots")
    assert not out.exists()
    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "convert", str(tiny_llama_path), str(out),
                        "--max-ram", "64M"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "floor" in p.stderr and "calibrate" in p.stderr and not out.exists()


def test_conversion_under_its_floor_keeps_the_cap(tmp_path):
    """Converted under --max-ram at its own floor (one training thread, predictors trained), the
    converter's RSS sampled from outside never passes the cap, and the file is the same as without."""
    import subprocess
    import sys
    from gguf_flash.config import config_from_gguf
    from gguf_flash.flash.convert_ram import convert_ram
    from gguf_flash.flash.head_build import index_rank
    from gguf_flash.flash.budget import sample_peak_rss
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "w.gguf", arch="llama", n_layer=4, n_embd=256, n_ff=768, n_head=4,
                          n_head_kv=2, n_vocab=4200, qtype="Q4_0", seed=5)
    f = GGUFFile(src)
    cfg = config_from_gguf(f)
    hb = f.tensor("token_embd.weight").n_bytes
    floor = convert_ram(f, cfg, 1024, 512, 0.25, True, index_rank(cfg.n_vocab, cfg.n_embd, hb), hb).floor
    outs = []
    for cap in (None, floor):
        out = tmp_path / f"{cap}.flash.gguf"
        cmd = [sys.executable, "-m", "gguf_flash.cli", "convert", str(src), str(out), "--calib",
               str(_calib_file(tmp_path)), "--calib-tokens", "1024", "--predictor", "always"]
        proc = subprocess.Popen(cmd + ([] if cap is None else ["--max-ram", str(cap)]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        peak = sample_peak_rss(proc, every=0.005)
        assert proc.returncode == 0, proc.stderr.read()
        outs.append(out.read_bytes())
    assert peak <= floor, (peak / 2**20, floor / 2**20)
    assert outs[0] == outs[1]


def _calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"word{i % 97} and{i % 13}" for i in range(3000)))
    return p


def test_relu_model_gets_zero_threshold(tmp_path):
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "relu.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, qtype="Q8_0", activation="relu", seed=3)
    r = gguf_flash.convert(src, tmp_path / "relu.flash.gguf", calib=_calib_file(tmp_path),
                           calib_tokens=1024, rank=16)
    assert r.thresholds == [0.0, 0.0] and r.sparsity == 0.0
    assert all(0.2 < s < 0.8 for s in r.layer_sparsity)   # ReLU's natural zeros, measured
    f = GGUFFile(tmp_path / "relu.flash.gguf")
    assert f.get(ff.K_ACTIVATION) == "relu"


def test_cli_convert_and_inspect(tmp_path, tiny_llama_path):
    import subprocess
    import sys
    out = tmp_path / "t.flash.gguf"
    cmd = [sys.executable, "-m", "gguf_flash.cli"]
    p = subprocess.run(cmd + ["convert", str(tiny_llama_path), str(out), "--calib", str(_calib_file(tmp_path)),
                              "--calib-tokens", "1024", "--sparsity", "0.5", "--rank", "8"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "peak RSS" in p.stdout and out.exists()
    p = subprocess.run(cmd + ["convert", str(tiny_llama_path), str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "--force" in p.stderr
    p = subprocess.run(cmd + ["inspect", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "flash v1: activation silu, target sparsity 0.50" in p.stdout
    assert "layer threshold sparsity predictor rank recall precision" in p.stdout
    assert ") in 2 of 2 layers" in p.stdout        # rank 8 is smaller than the Q8_0 gate rows: auto keeps both


# ---------------------------------------------------------------------------------------------------
# --predictor auto | always | never
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A two-layer synthetic llama (Q8_0: gate rows of 128 x 68 = 8704 bytes a layer) and its calibration."""
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("preds")
    src = write_synthetic(d / "t.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                          n_vocab=300, n_ctx=256, qtype="Q8_0", seed=5)
    return src, _calib_file(d)


def _pred_tensors(path):
    return sorted(n for n in GGUFFile(path).tensors if ".ffn_pred_" in n)


def test_predictor_never_stores_none_and_runs_with_gate_and_bundle(tmp_path, tiny_src):
    import subprocess
    import sys
    src, calib = tiny_src
    out = tmp_path / "never.flash.gguf"
    r = gguf_flash.convert(src, out, calib=calib, calib_tokens=512, sparsity=0.5, rank=8, predictor="never")
    assert r.ranks == [0, 0] and r.predictor_bytes == 0 and _pred_tensors(out) == []
    f = GGUFFile(out)
    assert list(f.get(ff.K_RANK)) == [0, 0]
    info = ff.read_flash(f, gguf_flash.load(out, mode="dense", n_ctx=16).cfg)
    assert not info.has_predictors and all(l.pred_a is None and l.pred_bytes == 0 for l in info.layers)
    toks = [5, 17, 99, 200, 3]
    logits = {}
    for sel in ("gate", "bundle", "auto"):
        llm = gguf_flash.load(out, n_ctx=64, selector=sel)
        assert llm.model.plan.selector in ("gate", "bundle", "product") and "predictors" not in llm.model.plan.resident
        logits[sel] = np.stack([llm.model.forward(t, p).copy() for p, t in enumerate(toks)])
    # the same neurons from resident gate rows as from the bundles' own gate parts
    np.testing.assert_allclose(logits["gate"], logits["bundle"], rtol=1e-4, atol=1e-3)
    with pytest.raises(InvalidArgumentError, match="this file has no predictors: convert with --predictor always"):
        gguf_flash.load(out, n_ctx=64, selector="predictor")
    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "run", "-m", str(out), "--selector", "predictor",
                        "-p", "hi", "-n", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and str(out) in p.stderr
    assert "this file has no predictors: convert with --predictor always" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "inspect", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "in 0 of 2 layers" in p.stdout
    rows = [l.split() for l in p.stdout.splitlines() if l.split()[:1] in (["0"], ["1"])]
    assert [row[3] for row in rows[-2:]] == ["no", "no"]


def test_product_criterion_stored_unless_asked_not_to(tmp_path, tiny_src):
    """The converter stores the product criterion (thresholds, per-row down norms in stored order and
    frequencies, its curve) and inspect shows it; with --no-product the file has none and --selector
    product is refused with one line naming the file (exit 2)."""
    import subprocess
    import sys
    src, calib = tiny_src
    out = tmp_path / "prod.flash.gguf"
    r = gguf_flash.convert(src, out, calib=calib, calib_tokens=512, sparsity=0.4, predictor="never")
    assert r.prod_sparsity == 0.4 and [s for s, _ in r.prod_curve] == [0.0, 0.4]
    assert len(r.prod_layer_sparsity) == 2 and all(0.2 < x < 0.6 for x in r.prod_layer_sparsity)
    f = GGUFFile(out)
    cfg = gguf_flash.load(out, mode="dense", n_ctx=16).cfg
    info = ff.read_flash(f, cfg)
    assert info.has_product and info.prod_sparsity == pytest.approx(0.4)
    src_f = GGUFFile(src)
    from gguf_flash.flash.convert_stats import dequant
    for il, l in enumerate(info.layers):
        dn = np.linalg.norm(dequant(src_f, f"blk.{il}.ffn_down.weight"), axis=0)
        np.testing.assert_allclose(l.down_norm, dn[l.neuron_id], rtol=1e-5)
        assert l.prod_threshold > 0 and 0.3 < float(np.mean(l.prod_freq)) < 0.8
    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "inspect", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "product criterion (--selector product): target sparsity 0.40" in p.stdout
    none = tmp_path / "noprod.flash.gguf"
    gguf_flash.convert(src, none, calib=calib, calib_tokens=512, sparsity=0.4, predictor="never", product=False)
    assert ff.K_PROD_THRESHOLD not in GGUFFile(none).meta and not ff.read_flash(GGUFFile(none), cfg).has_product
    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "run", "-m", str(none), "--selector", "product",
                        "-p", "hi", "-n", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and str(none) in p.stderr and "no product criterion" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_predictor_always_keeps_every_layer(tmp_path, tiny_src):
    """always = the behaviour before --predictor: a predictor in every layer, even where it is larger than
    the gate rows (rank 64: 2 x 64 x (64 + 128) + 4 x 128 = 25088 bytes > 8704), and the predictor
    selector runs, with its resident bytes as the plan counts them."""
    src, calib = tiny_src
    out = tmp_path / "always.flash.gguf"
    r = gguf_flash.convert(src, out, calib=calib, calib_tokens=512, sparsity=0.5, rank=64, predictor="always")
    assert r.ranks == [64, 64] and r.predictor_bytes == 2 * 25088
    assert len(_pred_tensors(out)) == 6
    llm = gguf_flash.load(out, n_ctx=64, selector="predictor")
    m = llm.model
    assert m.plan.selector == "predictor" and m.info.has_predictors
    resident = sum(a.nbytes + b.nbytes for a, b in m.select.pred) + sum(l.pred_bias.nbytes for l in m.info.layers)
    assert m.plan.resident["predictors"] == resident == 2 * 25088
    assert all(a.dtype == np.uint16 and b.dtype == np.uint16 for a, b in m.select.pred)   # F16, as stored
    logits = np.stack([m.forward(t, p).copy() for p, t in enumerate([5, 17, 99])])
    assert np.isfinite(logits).all()


def test_predictor_auto_stores_only_those_smaller_than_the_gate_rows(tmp_path, tiny_src):
    """auto: rank 8 (2 x 8 x 192 + 512 = 3584 bytes < 8704 of gate rows) in every layer; rank 64 (25088)
    in none, and those layers are not trained at all."""
    from gguf_flash.flash import convert as conv
    src, calib = tiny_src
    small = gguf_flash.convert(src, tmp_path / "a8.flash.gguf", calib=calib, calib_tokens=512, sparsity=0.5,
                               rank=8)          # auto is the default
    assert small.ranks == [8, 8] and len(_pred_tensors(tmp_path / "a8.flash.gguf")) == 6
    trained = []
    real = conv.train_predictor

    def spy(*a, **k):
        trained.append(k["rank"])
        return real(*a, **k)

    import unittest.mock
    with unittest.mock.patch.object(conv, "train_predictor", spy):
        big = gguf_flash.convert(src, tmp_path / "a64.flash.gguf", calib=calib, calib_tokens=512, sparsity=0.5,
                                 rank=64, predictor="auto")
    assert big.ranks == [0, 0] and trained == [] and _pred_tensors(tmp_path / "a64.flash.gguf") == []
    assert big.phases["predictors"] < small.phases["predictors"] + 5
    # SmolLM2's layer (576 x 1536, Q4_1 gate rows of 360 bytes): rank 128 is smaller, 256 (the search's
    # largest) is not, so the default search stores none there
    from types import SimpleNamespace
    cfg = SimpleNamespace(n_embd=576, n_ff=1536)
    assert conv._wants_predictor("auto", 128, cfg, 3) and not conv._wants_predictor("auto", 256, cfg, 3)
    assert conv._wants_predictor("always", 256, cfg, 3) and not conv._wants_predictor("never", 8, cfg, 3)
    with pytest.raises(InvalidArgumentError, match="--predictor"):
        gguf_flash.convert(src, tmp_path / "x.flash.gguf", calib=calib, predictor="sometimes")


def test_file_with_a_predictor_in_every_layer_loads_as_before(smollm2_flash):
    """Files written before --predictor had one in every layer: the same keys and tensors as always
    (ranks > 0 in flash.predictor.rank, three tensors a layer); they load and offer the predictor."""
    path, report = smollm2_flash
    f = GGUFFile(path)
    assert list(f.get(ff.K_RANK)) == [32] * 30 and len(_pred_tensors(path)) == 3 * 30
    m = gguf_flash.load(path, n_ctx=64, selector="predictor").model
    assert m.info.has_predictors and m.plan.selector == "predictor"
    assert m.plan.resident["predictors"] == report.predictor_bytes == sum(l.pred_bytes for l in m.info.layers)


def test_row_blocks_write_the_rows_in_order_and_release_each_block(tmp_path):
    """convert_write._RowBlocks writes a tensor's bytes as a[order] (or a) would be, a block at a time,
    and releases the source's pages after each block."""
    from gguf_flash.flash.convert_write import _RowBlocks
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (10_000, 34), dtype=np.uint8)
    order = rng.permutation(len(a)).astype(np.int32)
    for o, want, blocks in ((order, a[order], -(-len(a) // _RowBlocks.ORDER_ROWS)), (None, a, 2)):
        calls = []
        rb = _RowBlocks(a, o, lambda: calls.append(1))
        rb.BLOCK_BYTES = 200_000                  # 5,882 rows of 34 bytes: two blocks as stored
        path = tmp_path / "t.bin"
        with open(path, "wb") as fout:
            rb.tofile(fout)
        assert rb.nbytes == a.nbytes and path.read_bytes() == want.tobytes() and len(calls) == blocks


def test_per_token_top_k_rules_are_stored_and_computed(tmp_path, tiny_src):
    """--topk-sparsity stores the gate rows' per-token top-k rule (format.K_GATE_KEEP); --selector gate
    then chooses exactly keep rows a token in every layer, and computes the model the converter measured
    it on: the source model with the same rule (thresholds -keep, forward.rows_glu) gives the same prompt
    logits as the flash file's prompt chunk and, token by token, its decode step. The bundle selector
    keeps the threshold rule; inspect names the rule. The same for the product criterion's rule and
    --selector product (the source model with ffn_scale and thresholds -keep)."""
    import subprocess
    import sys
    from gguf_flash.model import Model
    src, calib = tiny_src
    out = tmp_path / "topk.flash.gguf"
    r = gguf_flash.convert(src, out, calib=calib, calib_tokens=512, sparsity=0.4, predictor="never",
                           topk_sparsity=0.5)
    assert r.keep_sparsity == 0.5 and [s for s, _ in r.keep_curve] == [0.0, 0.5]
    f = GGUFFile(out)
    assert list(f.get(ff.K_GATE_KEEP)) == [64, 64]
    gate = gguf_flash.load(out, n_ctx=64, selector="gate")
    info = gate.model.info
    assert info.keep_sparsity == pytest.approx(0.5) and [l.keep for l in info.layers] == [64, 64]
    assert list(gate.model.thresholds) == [0.0, 0.0]
    bundle = gguf_flash.load(out, n_ctx=64, selector="bundle")
    assert all(t == pytest.approx(l.threshold) and t > 0 for t, l in zip(bundle.model.thresholds, info.layers))

    toks = [5, 17, 99, 200, 3, 41, 8]
    ref = Model(GGUFFile(src), n_ctx=64)
    ref.w.thresholds[:] = -64.0
    want = ref.prefill(toks, 0).astype(np.float64)
    chunk = gguf_flash.load(out, n_ctx=64, selector="gate")
    got_chunk = chunk.model.prefill(toks, 0).astype(np.float64)
    got_step = [gate.model.forward(t, p).astype(np.float64).copy() for p, t in enumerate(toks)][-1]
    for got in (got_chunk, got_step):
        assert int(np.argmax(got)) == int(np.argmax(want))
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert all(s.active == 2 * 64 for s in gate.model.stats)      # exactly keep rows, every layer
    dense = Model(GGUFFile(src), n_ctx=64).prefill(toks, 0).astype(np.float64)
    assert np.abs(want - dense).max() > 10 * np.abs(got_step - want).max()   # the rule is not a no-op

    # the product criterion's own top-k rule, stored at the same forced sparsity
    assert r.prod_keep_sparsity == 0.5 and list(f.get(ff.K_PROD_KEEP)) == [64, 64]
    assert [l.prod_keep for l in info.layers] == [64, 64]
    prod = gguf_flash.load(out, n_ctx=64, selector="product")
    ref = Model(GGUFFile(src), n_ctx=64)
    scale = np.zeros((2, 128), np.float32)
    for il, l in enumerate(info.layers):
        scale[il, l.neuron_id] = l.down_norm       # stored row order -> the source's neuron order
    ref.w.ffn_scale, ref.w.thresholds[:] = scale, -64.0
    want = ref.prefill(toks, 0).astype(np.float64)
    got_chunk = gguf_flash.load(out, n_ctx=64, selector="product").model.prefill(toks, 0).astype(np.float64)
    got_step = [prod.model.forward(t, p).astype(np.float64).copy() for p, t in enumerate(toks)][-1]
    for got in (got_chunk, got_step):
        assert int(np.argmax(got)) == int(np.argmax(want))
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert all(s.active == 2 * 64 for s in prod.model.stats)
    # the file's own re-quantized down parts differ from the source by ~0.03 a logit (dense mode against
    # dense); the product rule adds rows flipped at its boundary by the 8-bit inputs (half of them near
    # ties on these random weights) but stays within 3x that, and moves the logits more than it errs
    file_dense = gguf_flash.load(out, n_ctx=64, mode="dense").model.prefill(toks, 0).astype(np.float64)
    err = np.abs(got_step - want).mean()
    assert err < 3 * np.abs(file_dense - dense).mean() and np.abs(want - dense).mean() > err

    p = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "inspect", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "gate rows' per-token top-k (--selector gate): keep 64 of 128" in p.stdout
    assert "product per-token top-k (--selector product): keep 64 of 128" in p.stdout
