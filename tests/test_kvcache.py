"""The KV cache in F16 (llama.cpp's default) or F32: the conversion kernels against numpy's float16,
the two caches against each other on SmolLM2, the bytes, and the CLI's -ctk/-ctv."""

import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from gguf_flash.errors import InvalidArgumentError
from gguf_flash.kernels.kvcache import kv_get, kv_put


@njit(cache=False)
def _round_trip(row, src, out):
    kv_put(row, src)
    for i in range(src.shape[0]):
        out[i] = kv_get(row, i)


def test_half_conversion_matches_numpy():
    rng = np.random.default_rng(0)
    src = np.concatenate([rng.standard_normal(1000) * 10, [0.0, -0.0, 65504.0, 1e-8, 70000.0, -3.3e-5]])
    src = src.astype(np.float32)
    row, out = np.zeros(src.shape, np.uint16), np.zeros(src.shape, np.float32)
    _round_trip(row, src, out)
    with np.errstate(over="ignore"):                                          # 70000 -> inf, as in numpy
        half = src.astype(np.float16)
    np.testing.assert_array_equal(row, half.view(np.uint16))                   # round to nearest even
    np.testing.assert_array_equal(out, half.astype(np.float32))
    row32 = np.zeros(src.shape, np.float32)
    _round_trip(row32, src, out)
    np.testing.assert_array_equal(out, src)


def test_f16_cache_is_half_the_bytes_and_keeps_the_logits(smollm2_path):
    import gguf_flash
    a = gguf_flash.load(smollm2_path, n_ctx=128, n_threads=2)                  # f16 by default
    b = gguf_flash.load(smollm2_path, n_ctx=128, n_threads=2, kv_type="f32")
    assert a.model.st.k_cache.dtype == np.uint16 and b.model.st.k_cache.dtype == np.float32
    assert 2 * a.model.st.k_cache.nbytes == b.model.st.k_cache.nbytes
    ids = a.tokenize("The history of the printing press begins in the fifteenth century, when")
    la, lb = a.logits(ids, all_positions=True), b.logits(ids, all_positions=True)
    assert (la.argmax(1) == lb.argmax(1)).all()
    assert np.abs(la - lb).max() < 0.1 * np.abs(lb).max()
    ra, rb = a.generate(ids, n_predict=8), b.generate(ids, n_predict=8)          # decode path too
    assert ra.tokens[:4] == rb.tokens[:4]


def test_bad_cache_types(smollm2_path):
    import gguf_flash
    with pytest.raises(InvalidArgumentError, match="KV cache type 'q8'"):
        gguf_flash.load(smollm2_path, n_ctx=16, kv_type="q8")
    proc = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "run", "-m", str(smollm2_path), "-p", "hi",
                           "-n", "1", "-ctk", "f16", "-ctv", "f32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "-ctk f16 -ctv f32" in proc.stderr
