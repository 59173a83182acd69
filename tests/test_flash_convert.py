"""The converter: the flash-GGUF format, identity with the source model, predictors, bad input."""

import os

import gguf
import numpy as np
import pytest

import gguf_flash
from gguf_flash.errors import GGUFFormatError, InvalidArgumentError, UnsupportedModelError
from gguf_flash.flash import format as ff
from gguf_flash.gguf_file import GGUFFile


def test_flash_file_is_a_valid_gguf(smollm2_flash, smollm2_path):
    path, report = smollm2_flash
    r = gguf.GGUFReader(path)                       # the gguf package opens it
    names = {t.name for t in r.tensors}
    assert "blk.0.ffn_gate.weight" not in names and "blk.0.ffn_bundle" in names
    f, src = GGUFFile(path), GGUFFile(smollm2_path)
    assert f.alignment == ff.ALIGNMENT
    for name, info in src.tensors.items():          # every non-FFN tensor copied byte for byte
        if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
            continue
        assert np.array_equal(f.raw(name), src.raw(name)), name
    for key in src.meta:                            # every key of the source
        if key != "general.alignment":
            assert key in f.meta, key
    cfg = gguf_flash.load(path, mode="dense").cfg
    info = ff.read_flash(f, cfg)
    assert info.source_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    l0 = info.layers[0]
    assert l0.bundle_offset % 4096 == 0 and l0.part_bytes == (360, 360, 612)   # Q4_1, Q4_1, Q8_0
    assert np.all(np.diff(l0.freq) <= 0)            # hot-first
    # gate and up rows byte for byte, in the stored (hot-first) order
    bundle = f.raw(ff.t_bundle(0)).reshape(cfg.n_ff, -1)
    gate = src.raw("blk.0.ffn_gate.weight")
    assert np.array_equal(bundle[:, :360], gate[l0.neuron_id])


def test_every_neuron_active_reproduces_the_source(smollm2_flash, smollm2_llm, smollm2_ref):
    """Dense mode on the flash file = the source model up to the down columns' re-quantization
    (Q4_1 -> Q8_0): the next-token distributions agree (KL < 0.1 nats, the bound the dense decode
    path meets against the batch path) and llama.cpp's teacher-forced check passes."""
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
    from gguf_flash.flash.convert import dequant
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


def test_interrupted_conversion_leaves_nothing(tmp_path, tiny_llama_path, monkeypatch):
    from gguf_flash.flash import convert as conv
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = conv._bundle
    monkeypatch.setattr(conv, "_bundle", boom)
    out = tmp_path / "x.flash.gguf"
    with pytest.raises(KeyboardInterrupt):
        conv.convert(tiny_llama_path, out, calib_tokens=1024, sparsity=0.5, rank=8,
                     calib=_calib_file(tmp_path))
    assert not out.exists() and os.listdir(tmp_path) == ["calib.txt"]


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
    assert "layer threshold sparsity rank recall precision" in p.stdout
