"""The prompt batch's attention (kernels/nn.attention_batch: QB queries per task, each cache row decoded
once for them) against the decode kernel run query by query: sliding windows, grouped KV heads, batches
that are not a multiple of QB, F32 and F16 caches."""

import numpy as np
import pytest

from gguf_flash.kernels import nn
from gguf_flash.kernels.kvcache import kv_put


@pytest.mark.parametrize("T,pos0,window,kv", [(11, 20, 0, np.float32), (11, 20, 7, np.float32), (1, 0, 0, np.float32),
                                              (4, 3, 2, np.uint16), (13, 40, 0, np.uint16)])
def test_attention_batch_equals_attention_per_query(T, pos0, window, kv):
    rng = np.random.default_rng(T + pos0 + window)
    n_head, n_kv, hd, n_ctx = 4, 2, 16, 64
    q = rng.standard_normal((T, n_head * hd)).astype(np.float32)
    k = np.zeros((n_ctx, n_kv * hd), kv)
    v = np.zeros((n_ctx, n_kv * hd), kv)
    for t in range(pos0 + T):
        kv_put(k[t], rng.standard_normal(n_kv * hd).astype(np.float32))
        kv_put(v[t], rng.standard_normal(n_kv * hd).astype(np.float32))
    out = np.zeros((T, n_head * hd), np.float32)
    nn.attention_batch(out, q, k, v, np.zeros((nn.batch_score_rows(), n_ctx), np.float32), pos0, window, n_head, n_kv, hd,
                       np.float32(0.25))
    ref = np.zeros_like(out)
    for j in range(T):
        nn.attention(ref[j], q[j], k, v, np.zeros((n_head, n_ctx), np.float32), pos0 + j, window, n_head, n_kv,
                     hd, np.float32(0.25))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
