"""Every architecture end to end on tiny synthetic GGUFs, against the float64 numpy reference forward
pass (tests/reference_forward.py): llama (tied and separate head, a Q4_0 mix), qwen2 (q/k/v biases),
qwen3 (q/k norms, head_dim != n_embd / n_head), gemma3 (sliding window shorter than the context)."""

import numpy as np
import pytest

import gguf_flash
from gguf_flash.synthetic import write_synthetic
from reference_forward import load_reference

CASES = {
    "llama-tied-q8": dict(arch="llama", qtype="Q8_0", tied=True),
    "llama-output-q4_0": dict(arch="llama", qtype="Q4_0", tied=False, tokenizer="llama"),
    "llama-f16-q5_1": dict(arch="llama", qtype="Q5_1", embd_qtype="F16"),
    "qwen2": dict(arch="qwen2", qtype="Q8_0"),
    "qwen3": dict(arch="qwen3", qtype="Q8_0", head_dim=32),
    "gemma3": dict(arch="gemma3", qtype="Q8_0", n_layer=6, sliding_window=8, tokenizer="llama"),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_numpy_reference(name, tmp_path):
    kw = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=300, n_ctx=128, seed=7)
    kw.update(CASES[name])
    path = write_synthetic(tmp_path / f"{name}.gguf", **kw)
    llm = gguf_flash.load(path, n_ctx=64, n_threads=2)
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 299, size=24)]
    ref = load_reference(path).logits(tokens)                       # (24, n_vocab) float64
    batch = llm.logits(tokens, all_positions=True)
    tol = 0.05 if "q4" in name or "q5" in name else 0.02
    scale = np.abs(ref).max()
    np.testing.assert_allclose(batch, ref, atol=tol * scale)
    for pos, tok in enumerate(tokens):                               # the decode path too
        step = llm.model.forward(tok, pos)
        np.testing.assert_allclose(step, ref[pos], atol=2 * tol * scale)
    assert int(np.argmax(batch[-1])) == int(np.argmax(ref[-1]))


def test_generation_end_to_end_on_tiny_llama(tiny_llama_path):
    llm = gguf_flash.load(tiny_llama_path, n_ctx=128)
    res = llm.generate("hello world", n_predict=12, ignore_eos=True)
    assert len(res.tokens) == 12 and isinstance(res.text, str)
    again = llm.generate("hello world", n_predict=12, ignore_eos=True)
    assert again.tokens == res.tokens                               # greedy is deterministic
    pieces = list(llm.stream("hello world", n_predict=12))
    assert "".join(pieces) == res.text
