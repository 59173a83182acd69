"""Per-layer sparsity allocation (flash/allocate.py, convert --allocate): the per-layer costs against
whole passes, TEAL's greedy path, and the converter's allocation on a synthetic model; --sparsity X
stays one sparsity for all layers."""

import numpy as np
import pytest

import gguf_flash
from gguf_flash.errors import InvalidArgumentError
from gguf_flash.flash import format as ff
from gguf_flash.flash.allocate import bisect_path, greedy_path, layer_costs
from gguf_flash.flash.layerwise import LayerPass, Sequence
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.model import Model
from gguf_flash.synthetic import write_synthetic


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A three-layer synthetic llama and a calibration text of 2 chunks of 512 tokens at least."""
    d = tmp_path_factory.mktemp("alloc")
    path = write_synthetic(d / "t.gguf", arch="llama", n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                           n_vocab=300, n_ctx=512, qtype="Q8_0", seed=7)
    calib = d / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and{i % 13}" for i in range(3000)))
    return path, calib


def test_layer_costs_equal_whole_passes(src):
    """Each cost, measured from the dense states entering its layer, is the whole pass's NLL with only
    that layer sparsified minus the dense pass's (the shortcut's identity test)."""
    model = Model(GGUFFile(src[0]), n_ctx=256)
    c = model.cfg
    rng = np.random.default_rng(1)
    seqs = [Sequence(rng.integers(0, c.n_vocab, n).astype(np.int64)) for n in (150, 90)]
    Q = rng.uniform(0.01, 0.08, (c.n_layer, 2)).astype(np.float32)           # two "levels" of thresholds
    for scale in (None, rng.uniform(0.5, 2, (c.n_layer, c.n_ff)).astype(np.float32)):
        costs, dense = layer_costs(LayerPass(model), seqs, Q, scale, [0, 1])
        lp = LayerPass(model)
        total, n = lp.nll(seqs, None, scale)
        assert dense == pytest.approx(total / n, rel=1e-6)
        for il in range(c.n_layer):
            for k in range(2):
                thr = np.zeros(c.n_layer, np.float32)
                thr[il] = Q[il, k]
                t, n = lp.nll(seqs, thr, scale)
                assert costs[il, k] == pytest.approx(t / n - dense, abs=1e-6)
        assert np.abs(costs).max() > 1e-4        # the thresholds do cost something


def test_greedy_path_raises_the_cheapest_layer_first():
    costs = np.array([[1.0, 2.0, 10.0],      # layer 0: cheap until its third level
                      [0.5, 4.0, 5.0],       # layer 1: cheap first step
                      [3.0, 3.5, 4.0]])      # layer 2: costly first step, then cheap
    path = greedy_path(costs, [0.1, 0.2, 0.3])
    assert len(path) == 1 + 3 * 3 and [int(x) for x in path[0][1]] == [-1, -1, -1]
    assert [float(m) for m, _ in path] == pytest.approx([k * 0.1 / 3 for k in range(10)])
    # rates per 0.1: l0 1, 1, 8; l1 0.5, 3.5, 1; l2 3, 0.5, 0.5
    steps = [int(np.flatnonzero(b[1] != a[1])[0]) for a, b in zip(path, path[1:])]
    assert steps == [1, 0, 0, 2, 2, 2, 1, 1, 0]
    assert [int(x) for x in path[-1][1]] == [2, 2, 2]
    assert bisect_path(path, lambda i: i <= 4) == 4
    assert bisect_path(path, lambda i: False) == 0


def test_allocated_conversion(tmp_path, src, monkeypatch):
    """convert(allocate=True): per-layer sparsities whose mean is the reported sparsity (the file's
    sparsity key); the allocation's perplexity on the drive chunk within the budget; the curve's point
    for it the real held-out (judge) perplexity of the stored thresholds. (Whether the judge stays within
    the budget is not asserted: this random model's perplexity is not monotone in the sparsity, so the
    drive chunk says little about the held-out ones; docs/design.md has the real models' numbers.)
    Levels up to 0.9: at the default levels' 0.5 every layer of this model stays within the budget."""
    from gguf_flash.flash import convert as conv, convert_stats
    from gguf_flash.flash.calibrate import calibrate
    from gguf_flash.tokenizer import tokenizer_from_gguf
    path, calib = src
    monkeypatch.setattr(conv, "ALLOC_LEVELS", {"gate": (0.3, 0.6, 0.9), "product": (0.3, 0.6, 0.9)})
    out = tmp_path / "a.flash.gguf"
    r = gguf_flash.convert(path, out, calib=calib, calib_tokens=1024, allocate=True, predictor="never",
                           head_index=False)
    assert r.allocated and len(r.layer_target) == len(r.prod_layer_target) == 3
    f = GGUFFile(out)
    assert f.get(ff.K_SPARSITY) == pytest.approx(r.sparsity)
    assert f.get(ff.K_PROD_SPARSITY) == pytest.approx(r.prod_sparsity)
    model = Model(GGUFFile(path), n_ctx=512)
    cal = calibrate(model, tokenizer_from_gguf(model.file), calib.read_text(), 1024, 512, conv.HELD_OUT)
    drive, judge = cal.sequences(held_out=False)[-conv.DRIVE_CHUNKS:], cal.sequences(held_out=True)
    lp = LayerPass(model)
    ppl = lambda seqs, thr, scale: np.exp(np.divide(*lp.nll(seqs, thr, scale)))   # noqa: E731
    scale = np.stack([np.linalg.norm(convert_stats.dequant(model.file, f"blk.{il}.ffn_down.weight"), axis=0)
                      for il in range(3)]).astype(np.float32)
    for target, mean, curve, thr, sc in (
            (r.layer_target, r.sparsity, r.curve, r.thresholds, None),
            (r.prod_layer_target, r.prod_sparsity, r.prod_curve, f.get(ff.K_PROD_THRESHOLD), scale)):
        assert np.mean(target) == pytest.approx(mean)
        assert mean > 0 and len(set(target)) > 1               # not one sparsity for all layers
        assert ppl(drive, thr, sc) <= ppl(drive, None, None) * conv.PPL_BUDGET
        (_, judged), = [p for p in curve if p[0] == pytest.approx(mean)]
        assert judged == pytest.approx(ppl(judge, thr, sc), rel=1e-4)
        assert curve[0] == (0.0, pytest.approx(ppl(judge, None, None), rel=1e-6))
    cal.close()


def test_fixed_sparsity_is_uniform(tmp_path, src):
    path, calib = src
    r = gguf_flash.convert(path, tmp_path / "u.flash.gguf", calib=calib, calib_tokens=1024, sparsity=0.3,
                           predictor="never", head_index=False)
    assert not r.allocated and r.sparsity == 0.3 and r.prod_sparsity == 0.3
    assert r.layer_target == r.prod_layer_target == [0.3, 0.3, 0.3]
    with pytest.raises(InvalidArgumentError, match="--allocate"):
        gguf_flash.convert(path, tmp_path / "x.flash.gguf", calib=calib, sparsity=0.3, allocate=True)
