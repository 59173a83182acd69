"""The layer-major pass of the converter (flash/layerwise.py) against the token-major dense model:
the same FFN inputs, final states, perplexity, sparsity statistics and greedy continuations."""

import numpy as np
import pytest

from gguf_flash.flash.calibrate import calibrate, default_calibration_text
from gguf_flash.flash.convert import SPARSITY_GRID
from gguf_flash.flash.convert_stats import SparsityStats
from gguf_flash.flash.layerwise import LayerPass, Sequence
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.model import Model
from gguf_flash.perplexity import chunk_nll
from gguf_flash.synthetic import write_synthetic
from gguf_flash.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    """Post-norms, QK norms, sliding-window layers and GELU: every branch of the layer steps."""
    path = write_synthetic(tmp_path_factory.mktemp("lw") / "g.gguf", arch="gemma3", n_layer=3, n_embd=64,
                           n_ff=160, n_head=4, n_head_kv=1, n_vocab=4200, n_ctx=512, qtype="Q8_0",
                           sliding_window=16, seed=3)
    return GGUFFile(path)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tiny_llama_path, gemma_like):
    f = GGUFFile(tiny_llama_path) if request.param == "llama" else gemma_like
    return Model(f, n_ctx=256)


def token_major(model, toks):
    """(FFN inputs (n_layer, n, n_embd), final states (n, n_embd)) of one fresh-context sequence, by
    model._batch (forward_batch: every layer per prompt batch)."""
    c, ub = model.cfg, model.st.n_ubatch
    cap = np.zeros((c.n_layer, len(toks), c.n_embd), np.float32)
    H = np.zeros((len(toks), c.n_embd), np.float32)
    buf = np.zeros((c.n_layer, ub, c.n_embd), np.float32)
    for s in range(0, len(toks), ub):
        part = toks[s:s + ub]
        model._batch(part, s, ffn_in=buf)
        cap[:, s:s + len(part)] = buf[:, :len(part)]
        H[s:s + len(part)] = model.st.H[:len(part)]
    return cap, H


def random_sequences(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.cfg.n_vocab, n).astype(np.int64) for n in lengths]


def test_states_and_ffn_inputs_equal_the_token_major_pass(model):
    seqs = random_sequences(model, [200, 37, 129])
    ref = [token_major(model, t) for t in seqs]
    got = {}
    H = LayerPass(model).run([Sequence(t) for t in seqs], capture=True,
                             on_layer=lambda il, X: got.__setitem__(il, X.copy()))
    assert sorted(got) == list(range(model.cfg.n_layer))
    np.testing.assert_allclose(H, np.concatenate([h for _, h in ref]), rtol=1e-5, atol=1e-5)
    for il in range(model.cfg.n_layer):
        np.testing.assert_allclose(got[il], np.concatenate([c[il] for c, _ in ref]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["dense", "gate", "product"])
def test_nll_equals_chunk_nll(model, criterion):
    c = model.cfg
    seqs = random_sequences(model, [150, 90], seed=1)
    thresholds = np.full(c.n_layer, 0.0 if criterion == "dense" else 0.05, np.float32)
    scale = np.random.default_rng(2).uniform(0.5, 2, (c.n_layer, c.n_ff)).astype(np.float32) \
        if criterion == "product" else None
    model.w.thresholds[:] = thresholds
    if scale is not None:
        model.w.ffn_scale = scale
    try:
        ref = [chunk_nll(model, t) for t in seqs]
    finally:
        model.w.thresholds[:] = 0
        model.w.ffn_scale = model.w.ffn_scale[:0]
    total, n = LayerPass(model).nll([Sequence(t) for t in seqs], thresholds, scale)
    assert n == sum(k for _, k in ref) == 238
    assert total == pytest.approx(sum(x for x, _ in ref), rel=1e-5)
    if criterion != "dense":   # the thresholds do change the result
        assert abs(total - LayerPass(model).nll([Sequence(t) for t in seqs])[0]) > 1e-3


def test_greedy_states_equal_token_by_token_decoding(model):
    prompts = [[1, 5, 9], [7, 3, 2, 8, 4], [11]]
    n_new = 6
    ref = []
    for p in prompts:
        logits, states = model.prefill(p, 0), []
        for i in range(n_new):
            logits = model.prefill([int(np.argmax(logits))], len(p) + i)
            states.append(model.st.H[0].copy())
        ref.append(np.array(states))
    lp = LayerPass(model)
    for budget in (1, 1 << 30):     # one prompt at a time, and all in lockstep
        got = lp.greedy_states(prompts, n_new, kv_budget=budget)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_calibration_statistics_equal_the_whole_model_pass(tmp_path, tiny_llama_path):
    """The converter's per-layer statistics, gathered layer-major, equal those of FFN inputs captured by
    the whole-model (token-major) pass; the spilled inputs read back as captured (float16)."""
    f = GGUFFile(tiny_llama_path)
    model = Model(f, n_ctx=128)
    grid = np.array(SPARSITY_GRID)
    stats = SparsityStats(f, model.cfg, grid, True)
    cal = calibrate(model, tokenizer_from_gguf(f), default_calibration_text()[0], 512, 128,
                    on_layer=stats.add, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []            # the spill file has no name
    ref = SparsityStats(f, model.cfg, grid, True)
    caps = [token_major(model, cal.tokens[s:s + 128])[0] for s in range(0, len(cal.tokens), 128)]
    X_ref = np.concatenate(caps, axis=1)             # (n_layer, n_tokens, n_embd)
    for il in range(model.cfg.n_layer):
        ref.add(il, X_ref[il], cal.n_train)
        np.testing.assert_allclose(cal.train(il), X_ref[il, :cal.n_train].astype(np.float16), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(cal.held_out(il), X_ref[il, cal.n_train:].astype(np.float16), rtol=1e-3,
                                   atol=1e-3)
    np.testing.assert_allclose(stats.q, ref.q, rtol=1e-4)
    np.testing.assert_allclose(stats.qp, ref.qp, rtol=1e-4)
    np.testing.assert_allclose(stats.dn, ref.dn, rtol=1e-6)
    assert np.abs(stats.p_count - ref.p_count).max() <= 2          # a token at a threshold's edge
    np.testing.assert_allclose(stats.p_held, ref.p_held, atol=2e-3)
    assert (stats.q[:, 1:] >= stats.q[:, :-1]).all() and stats.q[:, -1].min() > 0
    cal.close()
