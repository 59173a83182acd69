"""Per-layer sparsity allocation (flash/allocate.py, measured by tools/bench_alloc.py): the per-layer
costs against whole passes, and TEAL's greedy path."""

import numpy as np
import pytest

from gguf_flash.flash.allocate import greedy_path, layer_costs
from gguf_flash.flash.layerwise import LayerPass, Sequence
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.model import Model
from gguf_flash.synthetic import write_synthetic


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A three-layer synthetic llama."""
    d = tmp_path_factory.mktemp("alloc")
    path = write_synthetic(d / "t.gguf", arch="llama", n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                           n_vocab=300, n_ctx=512, qtype="Q8_0", seed=7)
    return path


def test_layer_costs_equal_whole_passes(src):
    """Each cost, measured from the dense states entering its layer, is the whole pass's NLL with only
    that layer sparsified minus the dense pass's (the shortcut's identity test)."""
    model = Model(GGUFFile(src), n_ctx=256)
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
