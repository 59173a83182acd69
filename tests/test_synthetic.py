"""Synthetic GGUF models: layout against gguf.GGUFReader, values against gguf.quants, sanity of a numpy
forward pass, and the power-law hot neurons."""

import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguf_flash import synthetic as syn
from gguf_flash.errors import InvalidArgumentError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]


def read(path):
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, kv


def dequantized(reader) -> dict:
    """name -> float64 array in numpy order (rows, cols)."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}


# ------------------------------------------------------------------------------------------------
# Numpy reference forward pass of the first token (position 0: softmax over one key is 1, so each
# q head's attention output is its kv head's v and RoPE / q-k norms play no part).
# ------------------------------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def act(z, kind):
    if kind == "silu":
        return z / (1.0 + np.exp(-z))
    if kind == "gelu":  # tanh approximation, as llama.cpp's ggml_gelu
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    return np.maximum(z, 0.0)


def forward_first_token(W, spec, tokens):
    """Logits (n_tok, n_vocab), FFN inputs and gate pre-activations per layer, for each token at pos 0."""
    eps = syn.RMS_EPS[spec.arch]
    x = W["token_embd.weight"][tokens]  # (n_tok, n_embd)
    if spec.arch == "gemma3":
        x = x * math.sqrt(spec.n_embd)
    ffn_in, gate = [], []
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        h = rmsnorm(x, W[b + "attn_norm.weight"], eps)
        v = h @ W[b + "attn_v.weight"].T + W.get(b + "attn_v.bias", 0.0)  # (n_tok, n_kv)
        group = spec.n_head // spec.n_head_kv
        att = np.repeat(v.reshape(len(tokens), spec.n_head_kv, spec.head_dim), group, axis=1)
        o = att.reshape(len(tokens), spec.n_q) @ W[b + "attn_output.weight"].T
        if spec.arch == "gemma3":
            o = rmsnorm(o, W[b + "post_attention_norm.weight"], eps)
        x = x + o
        h = rmsnorm(x, W[b + "ffn_norm.weight"], eps)
        g = h @ W[b + "ffn_gate.weight"].T  # (n_tok, n_ff)
        f = (act(g, spec.activation) * (h @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
        if spec.arch == "gemma3":
            f = rmsnorm(f, W[b + "post_ffw_norm.weight"], eps)
        x = x + f
        ffn_in.append(h)
        gate.append(g)
    x = rmsnorm(x, W["output_norm.weight"], eps)
    head = W.get("output.weight", W["token_embd.weight"])
    return x @ head.T, ffn_in, gate


# ------------------------------------------------------------------------------------------------
# Layout and metadata
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,qtype,tokenizer", [("llama", "Q4_0", "gpt2"), ("qwen2", "Q8_0", "llama"),
                                                  ("qwen3", "Q5_1", "gpt2"), ("gemma3", "F16", "llama")])
def test_layout_and_metadata(tmp_path, arch, qtype, tokenizer):
    kw = dict(arch=arch, qtype=qtype, tokenizer=tokenizer, n_layer=2, n_embd=64, n_ff=96, n_head=4,
              n_head_kv=2, n_vocab=320, seed=3)
    if arch in ("qwen3", "gemma3"):
        kw["head_dim"] = 32  # != n_embd / n_head: key_length / value_length must be written
    path = syn.write_synthetic(tmp_path / "m.gguf", **kw)
    spec = syn.SyntheticSpec(**kw)
    r, kv = read(path)
    assert not list(tmp_path.glob(".*tmp"))

    expected = syn.tensor_specs(spec)
    assert [t.name for t in r.tensors] == [name for name, _, _ in expected]
    for t, (name, shape, ttype) in zip(r.tensors, expected):
        assert t.tensor_type == ttype, name
        assert tuple(int(d) for d in t.shape) == tuple(reversed(shape)), name  # ggml ne order
        if name.endswith(("norm.weight", ".bias")):
            assert t.tensor_type == T.F32
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied by default
    assert ("blk.1.attn_k.bias" in names) == (arch == "qwen2")
    assert ("blk.1.attn_q_norm.weight" in names) == (arch in ("qwen3", "gemma3"))
    assert ("blk.0.post_ffw_norm.weight" in names) == (arch == "gemma3")
    if arch in ("qwen3", "gemma3"):
        q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
        assert tuple(int(d) for d in q.shape) == (64, 4 * 32)

    a = arch
    assert kv["general.architecture"] == arch
    assert kv[f"{a}.block_count"] == 2 and kv[f"{a}.embedding_length"] == 64
    assert kv[f"{a}.feed_forward_length"] == 96 and kv[f"{a}.context_length"] == 256
    assert kv[f"{a}.attention.head_count"] == 4 and kv[f"{a}.attention.head_count_kv"] == 2
    assert kv[f"{a}.rope.freq_base"] == 10000.0
    assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(syn.RMS_EPS[arch])
    assert kv[f"{a}.ffn_activation"] == ("gelu" if arch == "gemma3" else "silu")
    assert kv["general.file_type"] == int(syn.FILE_TYPES[qtype])
    if arch in ("qwen3", "gemma3"):
        assert kv[f"{a}.attention.key_length"] == 32 and kv[f"{a}.attention.value_length"] == 32
    else:
        assert f"{a}.attention.key_length" not in kv
    if arch == "gemma3":
        assert kv[f"{a}.attention.sliding_window"] == 64  # n_ctx // 4
    else:
        assert kv[f"{a}.rope.dimension_count"] == spec.head_dim

    tokens = kv["tokenizer.ggml.tokens"]
    types = kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320 and len(set(tokens)) == 320
    assert kv["tokenizer.ggml.model"] == tokenizer
    if tokenizer == "gpt2":
        assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]
        assert kv["tokenizer.ggml.pre"] == "smollm" and kv["tokenizer.ggml.add_bos_token"] is False
        assert len(kv["tokenizer.ggml.merges"]) == 320 - 259
    else:
        assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
        assert tokens[3 + 0x41] == "<0x41>" and set(types[3:259]) == {6}
        assert len(kv["tokenizer.ggml.scores"]) == 320 and kv["tokenizer.ggml.add_bos_token"] is True


def test_gpt2_vocab_runs_in_a_bpe_tokenizer():
    """The merges are consistent: HF `tokenizers` builds a byte-level BPE from them and round-trips text."""
    tokenizers = pytest.importorskip("tokenizers")
    toks, _, merges = syn.gpt2_vocab(1000)
    vocab = {t: i for i, t in enumerate(toks)}
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    text = "the cat is in the box, caf\u00e9!"
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text
    assert vocab["\u0120the"] in ids and len(ids) < 0.6 * len(text.encode())  # merges were used


def test_llama_vocab_pieces():
    toks, types, scores = syn.llama_vocab(600)
    assert len(toks) == len(types) == len(scores) == 600 and len(set(toks)) == 600
    assert "\u2581the" in toks and "\u2581a" in toks
    assert all(a > b for a, b in zip(scores[259:], scores[260:]))  # merge priority by score


# ------------------------------------------------------------------------------------------------
# Values: what the file holds is the quantized synthetic_weights
# ------------------------------------------------------------------------------------------------

REL_RMS_ERR = {"F32": 0.0, "F16": 1e-3, "Q8_0": 0.01, "Q5_1": 0.05, "Q5_0": 0.06, "Q4_1": 0.1, "Q4_0": 0.12}


@pytest.mark.parametrize("qtype", sorted(syn.QTYPES))
def test_dequantized_file_matches_synthetic_weights(tmp_path, qtype, monkeypatch):
    monkeypatch.setattr(syn, "ROW_CHUNK_ELEMENTS", 64 * 48)  # several chunks per 2-D tensor
    spec = syn.SyntheticSpec(arch="qwen2", qtype=qtype, tied=False, hot_alpha=0.8, n_layer=1, seed=7)
    r, _ = read(syn.write_synthetic(tmp_path / "m.gguf", spec=spec))
    for t in r.tensors:
        ref = syn.synthetic_weights(spec, t.name)  # float32, numpy order
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got.shape == ref.shape, t.name
        exact = gguf.quants.dequantize(gguf.quants.quantize(ref, t.tensor_type), t.tensor_type)
        np.testing.assert_array_equal(got, exact, err_msg=t.name)
        err = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2))
        assert err <= (REL_RMS_ERR[qtype] if ref.ndim == 2 else 0.0), (t.name, err)


def test_weights_are_deterministic_and_seeded():
    a = syn.SyntheticSpec(seed=1)
    w1 = syn.synthetic_weights(a, "blk.1.ffn_up.weight")
    np.testing.assert_array_equal(w1, syn.synthetic_weights(syn.SyntheticSpec(seed=1), "blk.1.ffn_up.weight"))
    assert not np.allclose(w1, syn.synthetic_weights(syn.SyntheticSpec(seed=2), "blk.1.ffn_up.weight"))
    assert not np.allclose(w1, syn.synthetic_weights(a, "blk.0.ffn_up.weight"))
    assert w1.dtype == np.float32 and w1.shape == (128, 64)
    assert abs(w1.std() - 1 / 8) < 0.01  # normal(0, 1/sqrt(n_in))


# ------------------------------------------------------------------------------------------------
# A forward pass gives sane logits; hot neurons follow a power law
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,hot", [("llama", None), ("qwen2", 1.0), ("qwen3", None), ("gemma3", 1.0),
                                      ("llama", 1.0)])
def test_forward_pass_is_sane(tmp_path, arch, hot):
    spec = syn.SyntheticSpec(arch=arch, n_layer=4, n_embd=128, n_ff=256, n_vocab=400, hot_alpha=hot,
                             qtype="Q8_0", seed=11)
    r, _ = read(syn.write_synthetic(tmp_path / "m.gguf", spec=spec))
    tokens = np.arange(3, 400, 7)
    logits, ffn_in, gate = forward_first_token(dequantized(r), spec, tokens)
    assert np.isfinite(logits).all()
    std = logits.std(axis=1)
    assert (std > 1.0).all() and (std < 10.0).all(), std  # LOGIT_STD = 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.median(p.max(1)) < 0.9  # not one-hot
    assert len(set(logits.argmax(1))) > len(tokens) // 4  # the next token depends on the token
    if hot is not None:
        m = syn.hot_dims(spec)
        for i, (h, g) in enumerate(zip(ffn_in, gate)):
            hm = h[:, m] / syn._hot_h(spec)  # the massive coordinates keep h[M] ~ HOT_H at every depth
            assert (hm > 0.6).all() and (hm < 1.6).all(), (i, hm.min(), hm.max())
            order = syn.hot_order(spec, i)
            freq = (np.abs(act(g, spec.activation)) > syn.hot_threshold(spec)).mean(0)[order]  # hottest first
            k = spec.n_ff // 10
            assert freq[:k].mean() > 5 * freq[-k:].mean() + 0.05, i


def test_hot_neurons_follow_a_power_law(tmp_path):
    """Plain numpy FFN on random normalized inputs that share the massive coordinates, as the model's do."""
    alpha, n_embd, n_ff = 1.0, 128, 1024
    k = n_ff // 10
    for activation in ("silu", "relu"):
        spec = syn.SyntheticSpec(n_embd=n_embd, n_ff=n_ff, n_layer=2, hot_alpha=alpha, qtype="Q8_0", seed=5,
                                 activation=activation)
        r, _ = read(syn.write_synthetic(tmp_path / "m.gguf", spec=spec))
        W = dequantized(r)
        rng = np.random.default_rng(0)
        for layer in range(2):
            x = syn.hot_residual_sample(spec, layer, 3000, rng)  # (3000, n_embd) like the model's residual
            h = rmsnorm(x, W[f"blk.{layer}.ffn_norm.weight"], 1e-5)
            a = np.abs(act(h @ W[f"blk.{layer}.ffn_gate.weight"].T, activation))  # (3000, n_ff)
            freq = (a > syn.hot_threshold(spec)).mean(0)[syn.hot_order(spec, layer)]  # hottest first
            assert freq[:k].mean() > 10 * freq[-k:].mean(), (layer, freq[:k].mean(), freq[-k:].mean())
            # the power law itself: log-log slope of frequency over ranks 2..64 is about -alpha
            ranks = np.arange(2, 65)
            slope = np.polyfit(np.log(ranks), np.log(freq[ranks - 1]), 1)[0]
            assert -1.3 * alpha < slope < -0.7 * alpha, (activation, layer, slope)
    # without hot_alpha there are no hot neurons: frequencies are flat
    plain = syn.SyntheticSpec(n_embd=n_embd, n_ff=n_ff, n_layer=2, seed=5)
    g = syn.synthetic_weights(plain, "blk.0.ffn_gate.weight").astype(np.float64)
    freq = np.sort(((rmsnorm(rng.standard_normal((2000, n_embd)), 1.0, 1e-5) @ g.T) > 0).mean(0))
    assert freq[-k:].mean() < 1.3 * freq[:k].mean()


# ------------------------------------------------------------------------------------------------
# Shapes, errors, atomic writes, CLI
# ------------------------------------------------------------------------------------------------

def test_named_shapes_have_their_parameter_counts():
    def n_params(shape):
        return sum(int(np.prod(s)) for _, s, _ in syn.tensor_specs(syn.make_spec(shape)))
    assert 1.09e9 < n_params("tinyllama-1.1b") < 1.11e9  # TinyLlama-1.1B: 1,100,048,384
    assert 6.7e9 < n_params("llama-7b") < 6.8e9           # Llama-2-7B: 6,738,415,616
    assert 1.30e8 < n_params("smollm2-135m") < 1.36e8     # SmolLM2-135M: 134,515,008 (tied)
    assert syn.make_spec("tinyllama-1.1b", n_layer=3).n_layer == 3


def test_invalid_arguments_raise_typed_errors(tmp_path):
    with pytest.raises(UnsupportedModelError):
        syn.SyntheticSpec(arch="mamba")
    with pytest.raises(UnsupportedModelError):
        syn.SyntheticSpec(qtype="Q4_K")
    with pytest.raises(InvalidArgumentError):
        syn.SyntheticSpec(n_embd=48)  # not a multiple of the 32-weight block
    with pytest.raises(InvalidArgumentError):
        syn.SyntheticSpec(n_head=4, n_head_kv=3)
    with pytest.raises(InvalidArgumentError):
        syn.SyntheticSpec(n_vocab=100)
    with pytest.raises(InvalidArgumentError):
        syn.make_spec("gpt-5")


def test_failed_write_leaves_nothing(tmp_path):
    def boom(name, i, n):
        if i == 5:
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        syn.write_synthetic(tmp_path / "m.gguf", progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_model(tmp_path):
    out = tmp_path / "cli.gguf"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(out), "--arch", "qwen3",
                          "--qtype", "Q4_1", "--hot-alpha", "1.2", "--n-layer", "3", "--untied"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    r, kv = read(out)
    assert kv["general.architecture"] == "qwen3" and kv["qwen3.block_count"] == 3
    assert {t.name for t in r.tensors} >= {"output.weight", "blk.2.ffn_gate.weight"}
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(out),
                          "--n-embd", "40"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "multiple of the quant block" in bad.stderr
