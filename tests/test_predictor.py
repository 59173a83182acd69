"""Low-rank activation predictors (gguf_flash/flash/predictor.py): ground truth against a float64 numpy
twin, recall/precision on synthetic data with a planted low-rank gate (explicit seeds), rank choice, bad
input, and one real SmolLM2 layer fed with FFN inputs from the float64 reference forward pass."""

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_flash.errors import InvalidArgumentError
from gguf_flash.flash.predictor import (Predictor, active_mask, evaluate, fit_smallest_rank,
                                        train_predictor)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_forward import (single_threaded_blas, attention, gelu_tanh, load_reference,  # noqa: E402
                               rms_norm, rope, silu)


# ---------------------------------------------------------------------------------------------------
# Synthetic data: X Gaussian with uneven per-dimension scales, W_gate = planted rank-k part + noise
# ---------------------------------------------------------------------------------------------------

def planted(seed, k, n=3000, n_embd=64, n_ff=128, noise=0.02):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, n_embd)) * rng.uniform(0.5, 2.0, n_embd)).astype(np.float32)
    W = (rng.standard_normal((n_ff, k)) @ rng.standard_normal((k, n_embd)) / math.sqrt(k * n_embd)
         + noise * rng.standard_normal((n_ff, n_embd)) / math.sqrt(n_embd)).astype(np.float32)
    return X, np.float32(0.4) * W                # gate values with std ~0.5, as in SmolLM2's layers


def splits(X, Y):
    """60% train, 20% val (calibration), 20% test."""
    a, b = int(0.6 * len(X)), int(0.8 * len(X))
    return (X[:a], Y[:a]), (X[a:b], Y[a:b]), (X[b:], Y[b:])


def threshold_for(X, W, sparsity, activation="silu"):
    G = (X.astype(np.float64) @ W.T.astype(np.float64))
    act = silu(G) if activation == "silu" else gelu_tanh(G)
    return float(np.quantile(np.abs(act), sparsity))


# ---------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_active_mask_matches_float64_twin(activation):
    X, W = planted(seed=1, k=8, n=200)
    G = X.astype(np.float64) @ W.T.astype(np.float64)                   # (n, n_ff) f64
    if activation == "relu":
        t, want = 0.0, G > 0
    else:
        act = silu(G) if activation == "silu" else gelu_tanh(G)
        t = float(np.quantile(np.abs(act), 0.6))
        want = np.abs(act) > t
    got = active_mask(X, W, t, activation)
    assert got.dtype == bool and got.shape == want.shape
    # f32 vs f64 may only disagree where the value sits on the threshold
    assert np.mean(got != want) < 1e-3


# ---------------------------------------------------------------------------------------------------
# Training on planted structure
# ---------------------------------------------------------------------------------------------------

def test_relu_predictor_recall_and_precision():
    X, W = planted(seed=2, k=8)
    Y = active_mask(X, W, 0.0, "relu")
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = splits(X, Y)
    pred = train_predictor(Xt, Yt, Xv, Yv, W, rank=8, kind="linear", seed=0)
    assert pred.recall >= 0.95
    recall, precision = evaluate(pred, Xs, Ys)
    assert recall >= 0.93                      # held-out tokens never seen in training or calibration
    assert precision > 0.9 > Y.mean() + 0.3
    assert (pred.A.shape, pred.B.shape, pred.bias.shape) == ((64, 8), (8, 128), (128,))
    assert pred.A.dtype == pred.B.dtype == pred.bias.dtype == np.float32


def test_silu_abs_predictor_beats_linear_and_base_rate():
    """|silu(g)| > t is two-sided in g (silu's negative lobe), so the "abs" rule is needed."""
    X, W = planted(seed=3, k=8)
    Y = active_mask(X, W, threshold_for(X, W, 0.5), "silu")
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = splits(X, Y)
    both = {kind: train_predictor(Xt, Yt, Xv, Yv, W, rank=8, kind=kind, seed=0) for kind in ("abs", "linear")}
    for pred in both.values():
        assert pred.recall >= 0.95
    recall, precision = evaluate(both["abs"], Xs, Ys)
    assert recall >= 0.93
    assert precision > Y.mean() + 0.25
    assert both["abs"].precision > both["linear"].precision + 0.1


def test_predict_scores_consistent():
    X, W = planted(seed=4, k=4, n=600)
    Y = active_mask(X, W, threshold_for(X, W, 0.7, "gelu"), "gelu")
    (Xt, Yt), (Xv, Yv), _ = splits(X, Y)
    pred = train_predictor(Xt, Yt, Xv, Yv, W, rank=4, epochs=2, seed=0)
    s = pred.scores(Xv)
    assert s.dtype == np.float32 and s.shape == Yv.shape
    np.testing.assert_array_equal(pred.predict(Xv), 1.0 / (1.0 + np.exp(-s.astype(np.float64))) > 0.5)
    # twin of the decision rule from the stored tensors
    z = (Xv.astype(np.float64) @ pred.A) @ pred.B + pred.bias
    np.testing.assert_allclose(s, np.abs(z) - pred.offset, atol=1e-3)
    # the calibrated margin is inside the predictor: recall at margin 0 is what it reports
    assert evaluate(pred, Xv, Yv) == (pred.recall, pred.precision)
    # a lower margin predicts a superset
    assert np.all(pred.predict(Xv, margin=-1.0) >= pred.predict(Xv))
    assert pred.n_bytes == 2 * (64 * 4 + 4 * 128) + 4 * 128


def test_fit_smallest_rank_follows_planted_rank():
    chosen = {}
    for k in (4, 16):
        X, W = planted(seed=5, k=k, noise=0.005)
        Y = active_mask(X, W, 0.0, "relu")
        (Xt, Yt), (Xv, Yv), _ = splits(X, Y)
        pred = fit_smallest_rank(Xt, Yt, Xv, Yv, W, ranks=(4, 8, 16, 32), kind="linear", epochs=4)
        assert pred.recall >= 0.95 and pred.precision > 0.85
        chosen[k] = pred.rank
    assert chosen[4] == 4
    assert chosen[16] >= 16


def test_fit_smallest_rank_warns_when_unreachable(caplog):
    X, W = planted(seed=6, k=8, n=800)
    Y = active_mask(X, W, threshold_for(X, W, 0.5), "silu")
    (Xt, Yt), (Xv, Yv), _ = splits(X, Y)
    with caplog.at_level(logging.WARNING, logger="gguf_flash.flash.predictor"):
        pred = fit_smallest_rank(Xt, Yt, Xv, Yv, W, ranks=(2, 4), min_precision=1.0, epochs=1)
    assert pred.rank == 4 and pred.recall >= 0.95
    assert any("no rank" in r.message for r in caplog.records)


def test_bad_input_refused():
    X, W = planted(seed=7, k=4, n=100)
    Y = active_mask(X, W, 0.0, "relu")
    cases = [
        lambda: active_mask(X[:, :10], W, 0.0, "relu"),                  # n_embd mismatch
        lambda: active_mask(X, W, -1.0, "silu"),                         # negative threshold
        lambda: active_mask(X, W, 0.1, "tanh"),                          # unknown activation
        lambda: active_mask(X[0], W, 0.1, "silu"),                       # 1-D X
        lambda: train_predictor(X, Y[:, :5], X, Y, W, rank=4),           # Y shape
        lambda: train_predictor(X, Y, X, Y, W, rank=0),                  # rank too small
        lambda: train_predictor(X, Y, X, Y, W, rank=65),                 # rank > min(n_embd, n_ff)
        lambda: train_predictor(X, Y, X, Y, W, rank=4, kind="cubic"),
        lambda: fit_smallest_rank(X, Y, X, Y, W, ranks=()),
        lambda: fit_smallest_rank(X, Y, X, Y, W, target_recall=1.5),
    ]
    for case in cases:
        with pytest.raises(InvalidArgumentError):
            case()
    pred = Predictor(A=np.zeros((64, 2), np.float32), B=np.zeros((2, 128), np.float32),
                     bias=np.zeros(128, np.float32), rank=2, recall=0.0, precision=0.0)
    with pytest.raises(InvalidArgumentError):
        pred.scores(np.zeros((3, 63), np.float32))


# ---------------------------------------------------------------------------------------------------
# Real data: SmolLM2 layer 1, FFN inputs from the float64 reference forward on ~400 tokens
# ---------------------------------------------------------------------------------------------------

def ffn_inputs(ref, tokens, layer):
    """(T, n_embd) f32 input of layer `layer`'s FFN (after ffn_norm): reference_forward's layer loop."""
    cfg = ref.config
    n = len(tokens)
    pos = np.arange(n)
    with single_threaded_blas():
        x = ref.weight("token_embd.weight", np.float32)[tokens].astype(np.float64) * cfg.embd_scale
        for il in range(layer + 1):
            p = f"blk.{il}"
            h = rms_norm(x, ref.weight(f"{p}.attn_norm.weight"), cfg.rms_eps)
            q = ref.linear(h, f"{p}.attn_q").reshape(n, cfg.n_head, cfg.head_dim)
            k = ref.linear(h, f"{p}.attn_k").reshape(n, cfg.n_head_kv, cfg.head_dim)
            v = ref.linear(h, f"{p}.attn_v").reshape(n, cfg.n_head_kv, cfg.head_dim)
            q = rope(q, pos, cfg.n_rot, cfg.rope_base, cfg.rope_style)
            k = rope(k, pos, cfg.n_rot, cfg.rope_base, cfg.rope_style)
            x = x + ref.linear(attention(q, k, v, cfg.q_scale, 0), f"{p}.attn_output")
            h = rms_norm(x, ref.weight(f"{p}.ffn_norm.weight"), cfg.rms_eps)
            if il == layer:
                return h.astype(np.float32), ref.weight(f"{p}.ffn_gate.weight", np.float32)
            g, u = ref.linear(h, f"{p}.ffn_gate"), ref.linear(h, f"{p}.ffn_up")
            x = x + ref.linear(silu(g) * u, f"{p}.ffn_down")


def test_real_smollm2_layer(smollm2_path):
    import pydoc_data.topics

    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.tokenizer import tokenizer_from_gguf

    f = GGUFFile(smollm2_path)
    tok = tokenizer_from_gguf(f)
    ref = load_reference(smollm2_path)
    assert ref.config.arch == "llama"
    X = np.concatenate([ffn_inputs(ref, np.array(tok.encode(pydoc_data.topics.topics[key])[:200]), layer=1)[0]
                        for key in ("assert", "for", "while")])      # (~600, 576) f32
    W = ffn_inputs(ref, np.array([1, 2]), layer=1)[1]                 # (1536, 576) f32
    assert X.shape[1] == 576 and W.shape == (1536, 576) and len(X) >= 450
    rng = np.random.default_rng(0)
    X = X[rng.permutation(len(X))]                                    # mix the three texts across splits
    Y = active_mask(X, W, threshold_for(X, W, 0.5), "silu")
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = splits(X, Y)
    pred = train_predictor(Xt, Yt, Xv, Yv, W, rank=64, epochs=4, seed=0)
    assert pred.recall >= 0.95
    recall, precision = evaluate(pred, Xs, Ys)
    assert recall >= 0.9
    assert precision > Y.mean() + 0.03


# ---------------------------------------------------------------------------------------------------
# The runtime's evaluation: A and B resident as the file's float16 bits
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 8, 37])
def test_f16_resident_predictor_equals_float32_evaluation(r):
    """sparse.predictor_logits reads A and B as float16 bits (uint16) and sums in float32: equal to the
    float32 evaluation of the same halves (numpy twin, float64 for reference) up to float rounding,
    and so it chooses the same neurons wherever a logit is not within rounding of the boundary."""
    from gguf_flash.kernels import sparse
    rng = np.random.default_rng(7)
    n_embd, n_ff = 96, 200
    A = (rng.standard_normal((n_embd, r)) / np.sqrt(n_embd)).astype(np.float16)      # (n_embd, r)
    B = rng.standard_normal((r, n_ff)).astype(np.float16)                             # (r, n_ff)
    bias = rng.standard_normal(n_ff).astype(np.float32)
    x = rng.standard_normal(n_embd).astype(np.float32)
    z = np.zeros(n_ff, np.float32)
    sparse.predictor_logits(z, np.zeros(r, np.float32), x, A.view(np.uint16), B.view(np.uint16), bias)
    want32 = (x @ A.astype(np.float32)) @ B.astype(np.float32) + bias
    want64 = (x.astype(np.float64) @ A.astype(np.float64)) @ B.astype(np.float64) + bias
    np.testing.assert_allclose(z, want32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, want64, rtol=1e-5, atol=1e-5)
    offset = np.float32(0.5)
    n = sparse.select_by_logit(np.zeros(n_ff, np.int32), z, offset, True)
    near = np.abs(np.abs(want64) - offset) < 1e-4
    assert abs(n - int((np.abs(want64) - offset > 0).sum())) <= int(near.sum())


# ---------------------------------------------------------------------------------------------------
# The basis and a gate read a block of rows at a time
# ---------------------------------------------------------------------------------------------------

def basis_twin(X, W, k):
    """The data-weighted basis as first written: C^(1/2) and C^(-1/2) whole, eigh of C^(1/2) W^T W C^(1/2)."""
    C = X.astype(np.float64).T @ X.astype(np.float64) / len(X)
    lam, E = np.linalg.eigh(C)
    lam = np.maximum(lam, 1e-6 * lam.max())
    c_half, c_ihalf = (E * np.sqrt(lam)) @ E.T, (E / np.sqrt(lam)) @ E.T
    W = W.astype(np.float64)
    _, U = np.linalg.eigh(c_half @ (W.T @ W) @ c_half)
    U = U[:, ::-1][:, :k]
    return c_ihalf @ U, U.T @ c_half @ W.T


def test_gate_basis_equals_its_direct_twin():
    """Every rank-r truncation x P_r Q_r is the twin's (products: an eigenvector's sign is free)."""
    from gguf_flash.flash.predictor import GateRows, gate_basis
    X, W = planted(7, 24, n=900)
    X = X * np.linspace(0.05, 3.0, X.shape[1], dtype=np.float32)   # an uneven second moment
    P0, Q0 = basis_twin(X, W, 32)
    P, Q = gate_basis(X, W, 32)
    assert P.shape == (64, 32) and Q.shape == (32, 128) and P.dtype == Q.dtype == np.float32
    for r in (1, 4, 24, 32):
        ref = P0[:, :r] @ Q0[:r]
        assert np.abs(P[:, :r] @ Q[:r] - ref).max() <= 1e-5 * np.abs(ref).max()
    rows = GateRows(W.shape, lambda r0, r1: W[r0:r1].copy())
    P1, Q1 = gate_basis(X.astype(np.float16).astype(np.float32), rows, 32)
    P2, Q2 = gate_basis(X.astype(np.float16), W, 32)               # float16 tokens, as the converter spills them
    assert np.array_equal(P1, P2) and np.array_equal(Q1, Q2)


def test_gate_rows_give_the_arrays_results():
    """active_mask and train_predictor read a GateRows as they read the array it stands for."""
    from gguf_flash.flash.predictor import GateRows, gate_basis
    X, W = planted(8, 8, n=1000)
    rows = GateRows(W.shape, lambda r0, r1: W[r0:r1])
    t = threshold_for(X, W, 0.5)
    Y = active_mask(X, W, t, "silu")
    assert np.array_equal(active_mask(X, rows, t, "silu"), Y)
    (Xt, Yt), (Xv, Yv), _ = splits(X, Y)
    a = train_predictor(Xt, Yt, Xv, Yv, W, rank=8, epochs=2, seed=0)
    with single_threaded_blas():    # as train_predictor makes its own basis (BLAS threads round differently)
        basis = gate_basis(Xt, rows, 8)
    b = train_predictor(Xt, Yt, Xv, Yv, rows, rank=8, epochs=2, seed=0, basis=basis)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B) and a.recall == b.recall
    bad = GateRows(W.shape, lambda r0, r1: np.full((r1 - r0, W.shape[1]), np.nan, np.float32))
    with pytest.raises(InvalidArgumentError, match="finite"):
        gate_basis(Xt, bad, 8)


def test_init_statistics_by_blocks_equal_the_whole_estimate():
    """The init's per-neuron class means and spreads, made 256 tokens at a time over a selection of rows
    (predictor._class_mean_std), equal those of the whole (n, n_ff) gate estimate in float64."""
    from gguf_flash.flash.predictor import _class_mean_std
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 16)).astype(np.float32)
    A = rng.standard_normal((16, 5)).astype(np.float32)
    B = rng.standard_normal((5, 40)).astype(np.float32)
    Y = rng.random((700, 40)) < np.linspace(0.0, 1.0, 40)            # column 0: no positive at all
    sub = rng.choice(700, 600, replace=False)
    G = (X[sub].astype(np.float64) @ A) @ B
    M = Y[sub]
    got = _class_mean_std(X, Y, sub, A, B)
    for (mean, std), mask in zip(got, (M, ~M)):
        cnt = np.maximum(mask.sum(0), 1)
        m = np.where(mask, G, 0).sum(0) / cnt
        sd = np.sqrt(np.maximum(np.where(mask, G * G, 0).sum(0) / cnt - m * m, 0)) + 1e-6
        assert mean.dtype == std.dtype == np.float32
        np.testing.assert_allclose(mean, m, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(std, sd, rtol=1e-4, atol=1e-4)
    assert got[0][0][0] == 0.0 and abs(got[0][1][0] - 1e-6) < 1e-9   # an empty class: mean 0, spread 0
