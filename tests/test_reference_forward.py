"""Tests of tests/reference_forward.py, the float64 NumPy forward pass other tests compare against.

Three layers of evidence:
1. Building blocks against explicit loop twins (attention with causal and sliding-window masks) and
   RoPE's defining property (scores depend only on the position difference).
2. Tiny synthetic GGUF models written with gguf.GGUFWriter: the fast header parser agrees with
   gguf.GGUFReader; RoPE NORM on llama.cpp-permuted q/k rows equals RoPE NEOX on the originals (llama vs
   qwen2 with biases); qwen3's per-head q/k norms make the logits blind to per-head q/k scaling;
   gemma3's sliding window bounds the receptive field; the pass is causal.
3. The real models against llama.cpp (../shared/reference/*.json): final-position top-1 id and top-10
   logits on every prompt, and teacher-forced greedy tokens on one prompt per model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

import reference_forward as rf

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"   # copies of ../shared/reference

# llama.cpp's own batched and token-by-token logits differ by up to 0.8 (SmolLM2) and 2.7 (Gemma 3)
# (reference/README.md); measured here: max |top-10 logit diff| 0.58 (SmolLM2), 1.40 (Gemma 3).
LOGIT_TOL = {"smollm2": 1.0, "gemma3": 2.0}


# ---------------------------------------------------------------------------------------------------
# 1. Building blocks
# ---------------------------------------------------------------------------------------------------

def _attention_loops(q, k, v, q_scale, n_swa):
    """Twin of rf.attention written as loops over query, head and key."""
    n_tokens, n_head, hd = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((n_tokens, n_head, hd))
    for i in range(n_tokens):
        for h in range(n_head):
            keys = [j for j in range(i + 1) if n_swa == 0 or i - j < n_swa]
            s = np.array([q_scale * q[i, h] @ k[j, h // group] for j in keys])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, h // group] for pj, j in zip(p, keys))
    return out.reshape(n_tokens, n_head * hd)


@pytest.mark.parametrize("n_swa", [0, 1, 3])
def test_attention_matches_loops(n_swa):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(9, 4, 8))                          # (T, n_head, hd)
    k = rng.normal(size=(9, 2, 8))                          # (T, n_head_kv, hd)
    v = rng.normal(size=(9, 2, 8))
    np.testing.assert_allclose(rf.attention(q, k, v, 0.3, n_swa), _attention_loops(q, k, v, 0.3, n_swa),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("style", [rf.ROPE_NORM, rf.ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope_is_relative(style, n_rot):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, 2, 16))
    k = rng.normal(size=(1, 2, 16))
    factors = rng.uniform(1.0, 8.0, size=n_rot // 2)

    def score(m, n):
        rq = rf.rope(q, np.array([m]), n_rot, 500.0, style, 0.5, factors)
        rk = rf.rope(k, np.array([n]), n_rot, 500.0, style, 0.5, factors)
        return np.sum(rq * rk, axis=-1)

    np.testing.assert_allclose(rf.rope(q, np.array([0]), n_rot, 500.0, style), q, rtol=0, atol=0)
    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-10)
    assert not np.allclose(score(7, 3), score(3, 3))
    # dims past n_rot are untouched; the norm of every head is preserved
    out = rf.rope(q, np.array([5]), n_rot, 500.0, style)
    np.testing.assert_array_equal(out[..., n_rot:], q[..., n_rot:])
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-12)


def test_gelu_tanh_known_values():
    # tanh-approximated GELU at 1 and -2 (HF gelu_pytorch_tanh): 0.8411920, -0.0454023
    np.testing.assert_allclose(rf.gelu_tanh(np.array([1.0, -2.0, 0.0])), [0.841192, -0.0454023, 0.0],
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 2. Tiny synthetic models
# ---------------------------------------------------------------------------------------------------

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB = 64, 4, 2, 16, 96, 50


def _tiny_weights(arch, seed, n_layer=2):
    """name -> float32 array in numpy order (n_out, n_in), like a converter would write."""
    rng = np.random.default_rng(seed)

    def mat(n_out, n_in):
        return (rng.normal(size=(n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.normal(size=n)).astype(np.float32)

    w = {"token_embd.weight": rng.normal(size=(N_VOCAB, N_EMBD)).astype(np.float32),
         "output_norm.weight": norm(N_EMBD)}
    for il in range(n_layer):
        p = f"blk.{il}"
        w[f"{p}.attn_norm.weight"] = norm(N_EMBD)
        w[f"{p}.attn_q.weight"] = mat(N_HEAD * HEAD_DIM, N_EMBD)
        w[f"{p}.attn_k.weight"] = mat(N_HEAD_KV * HEAD_DIM, N_EMBD)
        w[f"{p}.attn_v.weight"] = mat(N_HEAD_KV * HEAD_DIM, N_EMBD)
        w[f"{p}.attn_output.weight"] = mat(N_EMBD, N_HEAD * HEAD_DIM)
        w[f"{p}.ffn_norm.weight"] = norm(N_EMBD)
        w[f"{p}.ffn_gate.weight"] = mat(N_FF, N_EMBD)
        w[f"{p}.ffn_up.weight"] = mat(N_FF, N_EMBD)
        w[f"{p}.ffn_down.weight"] = mat(N_EMBD, N_FF)
        if arch == "qwen2":
            for t, n in (("q", N_HEAD), ("k", N_HEAD_KV), ("v", N_HEAD_KV)):
                w[f"{p}.attn_{t}.bias"] = (0.3 * rng.normal(size=n * HEAD_DIM)).astype(np.float32)
        if arch in ("qwen3", "gemma3"):
            w[f"{p}.attn_q_norm.weight"] = norm(HEAD_DIM)
            w[f"{p}.attn_k_norm.weight"] = norm(HEAD_DIM)
        if arch == "gemma3":
            w[f"{p}.post_attention_norm.weight"] = norm(N_EMBD)
            w[f"{p}.post_ffw_norm.weight"] = norm(N_EMBD)
    return w


def _write_gguf(path, arch, weights, n_layer=2, extra=None, q8_names=()):
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", n_layer)
    writer.add_uint32(f"{arch}.embedding_length", N_EMBD)
    writer.add_uint32(f"{arch}.feed_forward_length", N_FF)
    writer.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    writer.add_uint32(f"{arch}.attention.head_count_kv", N_HEAD_KV)
    writer.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    writer.add_uint32(f"{arch}.attention.value_length", HEAD_DIM)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 1000.0)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(N_VOCAB)])
    for name, arr in weights.items():
        if name in q8_names:
            writer.add_tensor(name, quantize(arr, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _interleave_rows(w, n_heads):
    """llama.cpp's HF->GGUF q/k permutation per head: new row 2i = old row i, 2i+1 = old row i + hd/2."""
    half = HEAD_DIM // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)   # (HEAD_DIM,)
    rows = np.concatenate([h * HEAD_DIM + order for h in range(n_heads)])
    return w[rows]


TOKENS = [3, 17, 42, 0, 9, 9, 31, 5, 48, 12, 7]


def test_fast_reader_matches_gguf_reader(tmp_path):
    weights = _tiny_weights("qwen2", seed=3)
    path = _write_gguf(tmp_path / "tiny.gguf", "qwen2", weights, q8_names=("blk.0.ffn_up.weight",))
    fast = rf._FastGGUF(path)
    meta, tensors = rf._from_gguf_reader(GGUFReader(str(path)))
    assert fast.metadata == meta
    assert fast.tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        f = fast.tensors[name]
        assert (f.qtype, f.ne, f.data.shape, f.data.dtype) == (t.qtype, t.ne, t.data.shape, t.data.dtype)
        np.testing.assert_array_equal(f.data, t.data)
    # and both give the same logits
    a = rf.load_reference(path).logits(TOKENS)
    b = rf.load_reference(reader=GGUFReader(str(path))).logits(TOKENS)
    np.testing.assert_array_equal(a, b)


def test_rope_norm_on_permuted_rows_equals_neox(tmp_path):
    """llama (NORM, interleaved q/k rows and biases) must equal qwen2 (NEOX, original rows)."""
    w = _tiny_weights("qwen2", seed=4)
    permuted = dict(w)
    for il in range(2):
        for t, n in (("q", N_HEAD), ("k", N_HEAD_KV)):
            for kind in ("weight", "bias"):
                name = f"blk.{il}.attn_{t}.{kind}"
                permuted[name] = _interleave_rows(w[name], n)
    neox = rf.load_reference(_write_gguf(tmp_path / "qwen2.gguf", "qwen2", w)).logits(TOKENS)
    norm = rf.load_reference(_write_gguf(tmp_path / "llama.gguf", "llama", permuted)).logits(TOKENS)
    np.testing.assert_allclose(norm, neox, rtol=1e-10, atol=1e-10)
    # the biases matter: dropping them changes the output
    no_bias = {k: v for k, v in w.items() if not k.endswith(".bias")}
    other = rf.load_reference(_write_gguf(tmp_path / "q2nb.gguf", "qwen2", no_bias)).logits(TOKENS)
    assert np.abs(other - neox).max() > 1e-3


def test_qwen3_qk_norm_is_per_head(tmp_path):
    w = _tiny_weights("qwen3", seed=5)
    scaled = dict(w)
    q = w["blk.0.attn_q.weight"].copy()
    q[HEAD_DIM:2 * HEAD_DIM] *= 7.0                           # head 1 only
    scaled["blk.0.attn_q.weight"] = q
    scaled["blk.1.attn_k.weight"] = w["blk.1.attn_k.weight"] * 4.0     # not tiny: eps must stay negligible
    base = rf.load_reference(_write_gguf(tmp_path / "a.gguf", "qwen3", w)).logits(TOKENS)
    same = rf.load_reference(_write_gguf(tmp_path / "b.gguf", "qwen3", scaled)).logits(TOKENS)
    np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-5)   # f32-stored weights: ~1e-7 relative
    # without the q/k norms (llama-shaped file) the same scaling does change the output
    plain = {k: v for k, v in w.items() if not k.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))}
    plain_scaled = {k: scaled[k] for k in plain}
    a = rf.load_reference(_write_gguf(tmp_path / "c.gguf", "qwen2", plain)).logits(TOKENS)
    b = rf.load_reference(_write_gguf(tmp_path / "d.gguf", "qwen2", plain_scaled)).logits(TOKENS)
    assert np.abs(a - b).max() > 1e-2


def test_causal_and_last_only(tmp_path):
    ref = rf.load_reference(_write_gguf(tmp_path / "t.gguf", "llama", _tiny_weights("llama", seed=6),
                                        q8_names=("blk.1.attn_q.weight", "token_embd.weight")))
    full = ref.logits(TOKENS)                                  # (T, n_vocab)
    assert full.shape == (len(TOKENS), N_VOCAB) and full.dtype == np.float64
    np.testing.assert_allclose(ref.logits(TOKENS[:4]), full[:4], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.logits(TOKENS, last_only=True), full[-1:], rtol=1e-12, atol=1e-12)


def test_gemma3_sliding_window_bounds_receptive_field(tmp_path):
    """5 gemma3 layers, all sliding (layer 5 would be the first global one), window 4: a token can
    reach at most 5 * 3 = 15 positions ahead, so position 19 cannot see token 0 -- unless the window
    is large."""
    n_layer = 5
    w = _tiny_weights("gemma3", seed=7, n_layer=n_layer)
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, N_VOCAB, size=20)]
    changed = [(tokens[0] + 1) % N_VOCAB] + tokens[1:]
    for window, sees_token_0 in ((4, False), (64, True)):
        path = _write_gguf(tmp_path / f"g{window}.gguf", "gemma3", w, n_layer=n_layer,
                           extra={"gemma3.attention.sliding_window": window})
        ref = rf.load_reference(path)
        assert ref.config.swa_layers == (True,) * n_layer
        a, b = ref.logits(tokens), ref.logits(changed)
        assert (np.abs(a[19] - b[19]).max() > 1e-6) == sees_token_0
        assert np.abs(a[15] - b[15]).max() > 1e-6            # 15 positions is still within reach


def test_gemma3_layer_pattern_and_scales(tmp_path):
    w = _tiny_weights("gemma3", seed=9, n_layer=7)
    path = _write_gguf(tmp_path / "g.gguf", "gemma3", w, n_layer=7,
                       extra={"gemma3.attention.sliding_window": 512})
    cfg = rf.load_reference(path).config
    assert cfg.swa_layers == (True, True, True, True, True, False, True)
    assert (cfg.rope_base_swa, cfg.rope_base) == (10000.0, 1000.0)
    assert cfg.embd_scale == math.sqrt(N_EMBD) and cfg.q_scale == 1.0 / math.sqrt(HEAD_DIM)
    assert cfg.rope_style == rf.ROPE_NEOX and cfg.activation == "gelu_tanh"


# ---------------------------------------------------------------------------------------------------
# 3. Real models against llama.cpp
# ---------------------------------------------------------------------------------------------------

def _prompts(name):
    return json.loads((REFERENCE / f"{name}.json").read_text())["prompts"]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return rf.load_reference(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return rf.load_reference(gemma3_path)


def _check_final_position(ref, prompt, tol):
    top = prompt["final_position_top"]
    logits = ref.logits(prompt["tokens_add_special"], last_only=True)[0]       # (n_vocab,)
    assert int(np.argmax(logits)) == top["ids"][0]
    diff = np.abs(logits[top["ids"]] - np.array(top["logits"])).max()
    assert diff < tol, f"{prompt['id']}: max |top-10 logit - llama.cpp| = {diff:.3f}"


def _check_teacher_forced(ref, prompt):
    """README check 2: feed prompt + greedy_ids; where llama.cpp's top-2 margin >= 0.5, agree on top-1."""
    n_prompt = len(prompt["tokens_add_special"])
    greedy = prompt["greedy_ids"]
    logits = ref.logits(prompt["tokens_add_special"] + greedy[:-1])           # (n_prompt + 31, n_vocab)
    predicted = np.argmax(logits[n_prompt - 1:], axis=1)                      # (32,)
    checked = [i for i, m in enumerate(prompt["greedy_top1_top2_margin"]) if m >= 0.5]
    assert len(checked) >= 16
    wrong = [i for i in checked if predicted[i] != greedy[i]]
    assert not wrong, f"{prompt['id']}: steps {wrong} disagree with llama.cpp's greedy tokens"


@pytest.mark.parametrize("prompt", _prompts("smollm2"), ids=lambda p: p["id"])
def test_smollm2_final_position_matches_llama_cpp(smollm2, prompt):
    _check_final_position(smollm2, prompt, LOGIT_TOL["smollm2"])


@pytest.mark.parametrize("prompt", _prompts("gemma3"), ids=lambda p: p["id"])
def test_gemma3_final_position_matches_llama_cpp(gemma3, prompt):
    _check_final_position(gemma3, prompt, LOGIT_TOL["gemma3"])


def test_smollm2_teacher_forced_greedy(smollm2):
    _check_teacher_forced(smollm2, _prompts("smollm2")[2])


def test_gemma3_teacher_forced_greedy(gemma3):
    _check_teacher_forced(gemma3, _prompts("gemma3")[2])
