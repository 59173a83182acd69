"""ModelConfig: the frozen hyperparameters of a model, read from GGUF metadata.

One small fix-up function per architecture (mlx-lm style) instead of `if arch == ...` in the forward
pass. Facts: llama.cpp src/llama-model.cpp (hparams loading) and ../shared/reference/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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


def _common(f, arch: str) -> dict:
    def need(key):
        v = f.get(f"{arch}.{key}")
        if v is None:
            raise GGUFFormatError(f"{f.path}: missing metadata key {arch}.{key}")
        return v

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_head_kv = int(f.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(f.get(f"{arch}.attention.key_length", n_embd // n_head))
    if int(f.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{f.path}: key_length != value_length is not supported")
    n_ff = need("feed_forward_length")
    if not isinstance(n_ff, int):  # per-layer arrays exist in some GGUFs
        raise UnsupportedModelError(f"{f.path}: per-layer feed_forward_length is not supported")
    tokens = f.get("tokenizer.ggml.tokens")
    n_vocab = int(f.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if n_vocab == 0:
        n_vocab = f.tensor("token_embd.weight").ne[1]
    act_name = f.get(f"{arch}.ffn_activation", "silu")  # our key for ReLU-family files (docs/flash-gguf.md)
    if act_name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{f.path}: unknown FFN activation {act_name!r}")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UnsupportedModelError(f"{f.path}: rope scaling {scaling!r} is not supported yet")
    rope_base = float(f.get(f"{arch}.rope.freq_base", 10000.0))
    n_layer = int(need("block_count"))
    return dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(n_ff), n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, n_vocab=n_vocab,
        n_ctx_train=int(f.get(f"{arch}.context_length", 2048)),
        rms_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=rope_base, rope_base_local=rope_base, rope_style=ROPE_NORM,
        rope_dim=int(f.get(f"{arch}.rope.dimension_count", head_dim)),
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
    window = int(f.get("gemma3.attention.sliding_window", 0))
    swa = tuple(window > 0 and (il + 1) % 6 != 0 for il in range(c["n_layer"]))
    return dict(c, rope_style=ROPE_NEOX, qk_norm=True, post_norms=True,
                activation=ACT_GELU_TANH if "gemma3.ffn_activation" not in f.meta else c["activation"],
                embd_scale=math.sqrt(c["n_embd"]), sliding_window=window, swa_layers=swa,
                rope_base_local=float(f.get("gemma3.rope.freq_base_swa", 10000.0)))


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3}


def config_from_gguf(f) -> ModelConfig:
    arch = f.arch
    fixup = ARCHITECTURES.get(arch)
    if fixup is None:
        raise UnsupportedModelError(f"{f.path}: unsupported architecture {arch!r} "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    return ModelConfig(**fixup(f, _common(f, arch)))


def with_overrides(cfg: ModelConfig, **kw) -> ModelConfig:
    return replace(cfg, **kw)
