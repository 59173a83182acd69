"""ModelConfig: the frozen hyperparameters of a model, read from GGUF metadata.

One small fix-up function per architecture (mlx-lm style) instead of `if arch == ...` in the forward
pass. Facts: llama.cpp src/llama-model.cpp (hparams loading) and ../shared/reference/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import GGUFFormatError, UnsupportedModelError

ROPE_NORM, ROPE_NEOX = 0, 1
ACT_SILU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2
ACTIVATIONS = {"silu": ACT_SILU, "gelu": ACT_GELU_TANH, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int                 # attention.key_length (= value_length for every supported arch)
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float              # global layers
    rope_base_local: float        # sliding-window layers (gemma3: 10000)
    rope_style: int               # ROPE_NORM (adjacent pairs) or ROPE_NEOX (i, i + d/2)
    rope_dim: int
    activation: int               # ACT_*
    embd_scale: float = 1.0       # gemma: sqrt(n_embd)
    attn_scale: float = 0.0       # softmax scale, set from head_dim
    sliding_window: int = 0       # 0: no sliding-window attention
    swa_layers: tuple = ()        # per layer: True if that layer uses the sliding window
    qk_norm: bool = False         # per-head RMSNorm of q and k (gemma3, qwen3)
    qkv_bias: bool = False        # qwen2
    post_norms: bool = False      # gemma3: post_attention_norm, post_ffw_norm
    tied_output: bool = True
    rope_freqs: bool = False      # llama3-style `rope_freqs.weight` divides the frequencies
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


# ---- typed metadata reads: a hostile file's key may hold any type or value ----

def meta_int(f, key, default=None, lo=0, hi=1 << 31):
    """An integer key within [lo, hi]; `default` when absent (None: the key is required)."""
    v = f.get(key, default)
    if v is None:
        raise GGUFFormatError(f"{f.path}: missing metadata key {key}")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise GGUFFormatError(f"{f.path}: metadata {key} = {_short(v)} is not an integer in [{lo}, {hi}]")
    return int(v)


def meta_float(f, key, default, lo=0.0, hi=math.inf, lo_open=True):
    """A finite float key in (lo, hi] (or [lo, hi] when not lo_open)."""
    v = f.get(key, default)
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise GGUFFormatError(f"{f.path}: metadata {key} = {_short(v)} is not a finite number in range")
    return float(v)


def meta_str(f, key, default):
    v = f.get(key, default)
    if not isinstance(v, str):
        raise GGUFFormatError(f"{f.path}: metadata {key} = {_short(v)} is not a string")
    return v


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _common(f, arch: str) -> dict:
    n_embd = meta_int(f, f"{arch}.embedding_length", lo=1)
    n_head = meta_int(f, f"{arch}.attention.head_count", lo=1)
    n_head_kv = meta_int(f, f"{arch}.attention.head_count_kv", n_head, lo=1)
    if n_head % n_head_kv:
        raise GGUFFormatError(f"{f.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    head_dim = meta_int(f, f"{arch}.attention.key_length", max(n_embd // n_head, 1), lo=2)
    if meta_int(f, f"{arch}.attention.value_length", head_dim, lo=1) != head_dim:
        raise UnsupportedModelError(f"{f.path}: key_length != value_length is not supported")
    if not isinstance(f.get(f"{arch}.feed_forward_length"), (int, type(None))):
        raise UnsupportedModelError(f"{f.path}: per-layer feed_forward_length is not supported")
    n_ff = meta_int(f, f"{arch}.feed_forward_length", lo=1)
    tokens = f.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else 0
    n_vocab = meta_int(f, f"{arch}.vocab_size", n_tokens)
    if n_vocab == 0:
        n_vocab = f.tensor("token_embd.weight").ne[-1]
    if n_tokens and n_tokens != n_vocab:
        raise GGUFFormatError(f"{f.path}: {n_tokens} tokens in the vocabulary, the model has {n_vocab}")
    act_name = meta_str(f, f"{arch}.ffn_activation", "silu")  # our key for ReLU-family files (docs/flash-gguf.md)
    if act_name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{f.path}: unknown FFN activation {act_name!r}")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UnsupportedModelError(f"{f.path}: rope scaling {_short(scaling)} is not supported yet")
    rope_base = meta_float(f, f"{arch}.rope.freq_base", 10000.0)
    n_layer = meta_int(f, f"{arch}.block_count", lo=1, hi=max(1, len(f.tensors)))
    rope_dim = meta_int(f, f"{arch}.rope.dimension_count", head_dim, lo=2, hi=head_dim)
    if rope_dim % 2:
        raise GGUFFormatError(f"{f.path}: rope.dimension_count {rope_dim} is odd")
    return dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, n_vocab=n_vocab,
        n_ctx_train=meta_int(f, f"{arch}.context_length", 2048, lo=1),
        rms_eps=meta_float(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, hi=1.0),
        rope_base=rope_base, rope_base_local=rope_base, rope_style=ROPE_NORM,
        rope_dim=rope_dim,
        activation=ACTIVATIONS[act_name], attn_scale=1.0 / math.sqrt(head_dim),
        swa_layers=(False,) * n_layer, tied_output="output.weight" not in f.tensors,
        rope_freqs="rope_freqs.weight" in f.tensors,
    )


def _llama(f, c: dict) -> dict:
    return c


def _qwen2(f, c: dict) -> dict:
    return dict(c, rope_style=ROPE_NEOX, qkv_bias=True)


def _qwen3(f, c: dict) -> dict:
    return dict(c, rope_style=ROPE_NEOX, qk_norm=True)


def _gemma3(f, c: dict) -> dict:
    # llama.cpp: swa pattern 6 (every 6th layer global), local rope base 10000 unless rope.freq_base_swa
    window = meta_int(f, "gemma3.attention.sliding_window", 0)
    swa = tuple(window > 0 and (il + 1) % 6 != 0 for il in range(c["n_layer"]))
    return dict(c, rope_style=ROPE_NEOX, qk_norm=True, post_norms=True,
                activation=ACT_GELU_TANH if "gemma3.ffn_activation" not in f.meta else c["activation"],
                embd_scale=math.sqrt(c["n_embd"]), sliding_window=window, swa_layers=swa,
                rope_base_local=meta_float(f, "gemma3.rope.freq_base_swa", 10000.0))


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3}


def config_from_gguf(f) -> ModelConfig:
    arch = f.arch
    fixup = ARCHITECTURES.get(arch)
    if fixup is None:
        raise UnsupportedModelError(f"{f.path}: unsupported architecture {arch!r} "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    cfg = ModelConfig(**fixup(f, _common(f, arch)))
    check_tensors(f, cfg)
    return cfg


# ---- tensor shapes against the hyperparameters ----
# A tensor smaller than the config says would let a compiled kernel read past it (or past the map):
# every tensor the forward pass reads is checked here, before any buffer is sized from the config.

FLOAT_TYPES = (0, 1)   # F32, F16: norms, biases, rope factors (read as plain arrays)


def expected_tensors(cfg: ModelConfig, ffn: bool = True) -> dict:
    """name -> ne (ggml order) of every tensor the forward pass reads; None for matrices' types."""
    c = cfg
    want = {"token_embd.weight": (c.n_embd, c.n_vocab), "output_norm.weight": (c.n_embd,)}
    if not c.tied_output:
        want["output.weight"] = (c.n_embd, c.n_vocab)
    if c.rope_freqs:
        want["rope_freqs.weight"] = (c.rope_dim // 2,)
    for il in range(c.n_layer):
        p = f"blk.{il}."
        want.update({p + "attn_norm.weight": (c.n_embd,), p + "ffn_norm.weight": (c.n_embd,),
                     p + "attn_q.weight": (c.n_embd, c.q_dim), p + "attn_k.weight": (c.n_embd, c.kv_dim),
                     p + "attn_v.weight": (c.n_embd, c.kv_dim), p + "attn_output.weight": (c.q_dim, c.n_embd)})
        if ffn:
            want.update({p + "ffn_gate.weight": (c.n_embd, c.n_ff), p + "ffn_up.weight": (c.n_embd, c.n_ff),
                         p + "ffn_down.weight": (c.n_ff, c.n_embd)})
        if c.post_norms:
            want.update({p + "post_attention_norm.weight": (c.n_embd,), p + "post_ffw_norm.weight": (c.n_embd,)})
        if c.qk_norm:
            want.update({p + "attn_q_norm.weight": (c.head_dim,), p + "attn_k_norm.weight": (c.head_dim,)})
        if c.qkv_bias:
            want.update({p + "attn_q.bias": (c.q_dim,), p + "attn_k.bias": (c.kv_dim,),
                         p + "attn_v.bias": (c.kv_dim,)})
    return want


def check_tensors(f, cfg: ModelConfig) -> None:
    """Every tensor the forward pass reads exists with the shape the hyperparameters imply, and 1-D
    ones are F32/F16. A flash file's FFN is checked by flash.format.read_flash instead."""
    ffn = "flash.version" not in f.meta
    for name, ne in expected_tensors(cfg, ffn).items():
        info = f.tensor(name)
        got = tuple(info.ne)
        while len(got) > len(ne) and got[-1] == 1:
            got = got[:-1]
        if got != ne:
            raise GGUFFormatError(f"{f.path}: tensor {name} has shape {list(info.ne)}, the model's "
                                  f"hyperparameters need {list(ne)}")
        if len(ne) == 1 and info.qtype not in FLOAT_TYPES:
            raise GGUFFormatError(f"{f.path}: tensor {name} is {info.type_name}, expected F32 or F16")


def with_overrides(cfg: ModelConfig, **kw) -> ModelConfig:
    return replace(cfg, **kw)
