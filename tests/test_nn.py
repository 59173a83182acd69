"""The element-wise pieces of kernels/nn.py against float64 numpy: the vectorizable exp, the activations
built on it, and attention with softmax weights below the floor dropped."""

import numpy as np
import pytest
from numba import njit

from gguf_flash.config import ACT_GELU_TANH, ACT_RELU, ACT_SILU
from gguf_flash.kernels import nn


@njit(cache=True)
def _exp_all(out, x):
    for i in range(x.shape[0]):
        out[i] = nn.fast_exp(x[i])


@njit(cache=True)
def _act_all(out, x, act):
    for i in range(x.shape[0]):
        out[i] = nn.activate(x[i], act)


def test_fast_exp_within_5_ulp_over_the_float32_range():
    x = np.linspace(-87.0, 88.0, 1_000_001).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(got, x)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    err = np.abs(got - want) / ulp
    assert err.max() <= 5.0 and err.mean() <= 2.0, (err.max(), err.mean())


def test_fast_exp_clamps_to_zero_and_inf_ends():
    got = np.empty(4, np.float32)
    _exp_all(got, np.array([-1000.0, -87.3, 89.0, 1000.0], np.float32))
    assert 0 < got[0] < 1.3e-38 and 0 < got[1] < 1.3e-38      # the smallest normal float, not a subnormal
    assert np.isinf(got[2]) and np.isinf(got[3])


@pytest.mark.parametrize("act", [ACT_SILU, ACT_GELU_TANH, ACT_RELU])
def test_activations_against_float64(act):
    x = np.concatenate([np.linspace(-30, 30, 20001), [-100.0, -88.0, 0.0, 88.0, 100.0]]).astype(np.float32)
    got = np.empty_like(x)
    _act_all(got, x, act)
    g = x.astype(np.float64)
    if act == ACT_SILU:
        want = g / (1 + np.exp(-g))
    elif act == ACT_GELU_TANH:   # 0.5 g (1 + tanh(y)) without its cancellation near y = -inf
        with np.errstate(over="ignore"):
            want = g / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    else:
        want = np.maximum(g, 0)
    # values below |g| e^-40 are flushed to 0 (nn.ACT_FLUSH): the absolute tolerance is that. rtol: the
    # exponent (up to 40) is computed in float32, and exp turns its rounding (6e-8 relative) into up to
    # 40 x 6e-8 = 2.4e-6 of the result; seen 2.9e-6 at g = -5.8 (GELU's cubic adds a rounding)
    np.testing.assert_allclose(got, want, rtol=4e-6, atol=np.abs(g).max() * np.exp(-40.0))
    assert got[-5] == 0 and got[-3] == 0 and got[-1] == 100


def test_attention_with_peaked_scores_matches_float64():
    """Scores 30x the usual spread: most softmax weights fall below exp(-80) and are dropped (the floor that
    keeps subnormal floats out); the output still equals the float64 softmax to float32 rounding."""
    rng = np.random.default_rng(0)
    n_head, n_kv, hd, T = 4, 2, 64, 96
    q = (rng.standard_normal(n_head * hd) * 30).astype(np.float32)
    k = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    out = np.empty(n_head * hd, np.float32)
    scores = np.empty((n_head, T), np.float32)
    scale = np.float32(hd ** -0.5)
    nn.attention(out, q, k, v, scores, T - 1, 0, n_head, n_kv, hd, scale)
    for h in range(n_head):
        kv = (h // (n_head // n_kv)) * hd
        s = k[:, kv:kv + hd].astype(np.float64) @ q[h * hd:(h + 1) * hd].astype(np.float64) * float(scale)
        p = np.exp(s - s.max())
        assert (s - s.max() < -80).sum() > 0          # the floor is exercised
        want = (p / p.sum()) @ v[:, kv:kv + hd].astype(np.float64)
        np.testing.assert_allclose(out[h * hd:(h + 1) * hd], want, rtol=1e-4, atol=1e-5)
