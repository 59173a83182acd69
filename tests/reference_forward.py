"""A slow, readable float64 NumPy forward pass: the reference the engine's kernels are tested against.

Not part of the package and deliberately independent of it (only the typed errors are shared): the
weights are dequantized by `gguf.quants.dequantize` (llama.cpp's own gguf-py), every activation is
float64, and every step is written as plainly as NumPy allows. Nothing here is fast.

Architectures (facts from llama.cpp src/models/{llama,qwen2,qwen3,gemma3}.cpp, src/llama-model.cpp
hparams loading, ggml's rope, and ../shared/reference/models.md):
  llama   RMSNorm, RoPE NORM (adjacent pairs 2i, 2i+1), GQA, SwiGLU, optional `rope_freqs.weight`
          (llama3: divides the rotation angle per frequency), optional biases, tied or separate head.
  qwen2   as llama, with q/k/v biases and RoPE NEOX (i with i + n_rot/2).
  qwen3   RoPE NEOX, per-head RMSNorm of q and k (attn_q_norm, attn_k_norm) before RoPE, no biases.
  gemma3  embedding * sqrt(n_embd); per-head q/k norms; post-attention and post-FFN norms; GeGLU with
          tanh-approximated GELU; sliding window 512 on layers where (il + 1) % 6 != 0, masked when
          q_pos - k_pos >= window; RoPE NEOX, base 10000 on sliding layers and rope.freq_base on global
          ones; q scaled by 1/sqrt(head_dim) before a scale-1 softmax (27B: 1/sqrt(n_embd/n_head));
          norm weights used as stored (the converter already added Gemma's +1).

Two ways to read the file: `gguf.GGUFReader` (pass `reader=`), or the default `_FastGGUF`, a 60-line
header parser. GGUFReader builds a Python object per vocabulary string and takes 5-40 s on Gemma 3's
262k-token vocabulary on this shared machine; `_FastGGUF` takes well under a second and
tests/test_reference_forward.py checks that it yields the same metadata and tensor bytes as GGUFReader.

Use:
    ref = load_reference(path)
    logits = ref.logits(token_ids)     # (n_tokens, n_vocab) float64, one full causal pass from pos 0
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from gguf_flash.errors import UnsupportedModelError

ROPE_NORM, ROPE_NEOX = "norm", "neox"
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


# ---------------------------------------------------------------------------------------------------
# Reading the file: metadata dict + tensor byte views shaped like GGUFReader's `tensor.data`
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple                 # ggml order: ne[0] = row length
    data: np.ndarray          # GGUFReader layout: (rows..., row_bytes) uint8, or (rows..., ne0) f32/f16


# GGUF value type -> struct code (GGUF spec; gguf-py constants.GGUFValueType)
_SCALAR_CODES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _FastGGUF:
    """Minimal GGUF v2/v3 reader: metadata as Python values, tensors as memmap views."""

    def __init__(self, path):
        self.path = str(path)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(mm)
        self._pos = 0
        magic = bytes(self._take(buf, 4))
        if magic != b"GGUF":
            raise UnsupportedModelError(f"{path}: not a GGUF file (magic {magic!r})")
        version, n_tensors, n_kv = self._read(buf, "<I"), self._read(buf, "<Q"), self._read(buf, "<Q")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{path}: GGUF version {version} not supported")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string(buf)
            self.metadata[key] = self._value(buf, self._read(buf, "<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string(buf)
            n_dims = self._read(buf, "<I")
            ne = tuple(self._read(buf, "<Q") for _ in range(n_dims))
            infos.append((name, GGMLQuantizationType(self._read(buf, "<I")), ne, self._read(buf, "<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {}
        for name, qtype, ne, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = ne[0] // block * type_size
            n_rows = int(np.prod(ne[1:], dtype=np.int64))
            start = data_start + offset
            raw = mm[start:start + n_rows * row_bytes]
            rows_shape = tuple(reversed(ne[1:]))
            if qtype == GGMLQuantizationType.F32:
                data = raw.view(np.float32).reshape(rows_shape + (ne[0],))
            elif qtype == GGMLQuantizationType.F16:
                data = raw.view(np.float16).reshape(rows_shape + (ne[0],))
            else:
                data = raw.reshape(rows_shape + (row_bytes,))
            self.tensors[name] = _Tensor(name, qtype, ne, data)

    def _take(self, buf, n):
        chunk = buf[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def _read(self, buf, code):
        return struct.unpack(code, self._take(buf, struct.calcsize(code)))[0]

    def _string(self, buf):
        return bytes(self._take(buf, self._read(buf, "<Q"))).decode("utf-8", errors="replace")

    def _value(self, buf, vtype):
        if vtype in _SCALAR_CODES:
            return self._read(buf, _SCALAR_CODES[vtype])
        if vtype == _STRING:
            return self._string(buf)
        if vtype == _ARRAY:
            etype, count = self._read(buf, "<I"), self._read(buf, "<Q")
            return [self._value(buf, etype) for _ in range(count)]
        raise UnsupportedModelError(f"{self.path}: unknown GGUF value type {vtype}")


def _from_gguf_reader(reader: GGUFReader):
    """(metadata, tensors) from a gguf.GGUFReader, in the same form _FastGGUF produces."""
    # GGUFReader also lists the header (GGUF.version, GGUF.tensor_count, GGUF.kv_count) as fields
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        ne = tuple(int(n) for n in t.shape)
        tensors[t.name] = _Tensor(t.name, GGMLQuantizationType(t.tensor_type), ne, t.data)
    return metadata, tensors


# ---------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int                # rotated dims per head (first n_rot of head_dim)
    rms_eps: float
    rope_style: str           # ROPE_NORM or ROPE_NEOX
    rope_base: float          # global layers
    rope_base_swa: float      # sliding-window layers
    rope_freq_scale: float    # 1 / rope.scaling.factor for linear scaling, else 1 (global layers only)
    activation: str           # "silu" | "gelu_tanh"
    embd_scale: float         # gemma3: sqrt(n_embd)
    q_scale: float            # multiplies q before q.k (softmax scale is then 1)
    qk_norm: bool             # per-head RMSNorm of q and k before RoPE
    post_norms: bool          # gemma3: RMSNorm after attention and after the FFN, before each residual add
    n_swa: int                # sliding window (0: none)
    swa_layers: tuple         # per layer: True if the layer uses the sliding window
    final_softcap: float      # 0: none


def _config(meta: dict) -> RefConfig:
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"reference forward: architecture {arch!r} not in {SUPPORTED_ARCHS}")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_layer, n_embd, n_head = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError("reference forward: key_length != value_length")
    n_rot = int(get("rope.dimension_count", head_dim))

    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise UnsupportedModelError(f"reference forward: rope scaling {scaling_type!r} not implemented")
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    freq_scale = 1.0 / factor if scaling_type == "linear" and factor > 0 else 1.0

    rope_base = float(get("rope.freq_base", 10000.0))
    gemma = arch == "gemma3"
    n_swa = int(get("attention.sliding_window", 0)) if gemma else 0
    # llama.cpp set_swa_pattern(6): layers 0-4 of each group of 6 slide, every 6th is global
    swa_layers = tuple(gemma and n_swa > 0 and (il + 1) % 6 != 0 for il in range(n_layer))
    if gemma:
        # llama-model.cpp LLM_ARCH_GEMMA3: f_attention_scale; the 27B (62 layers) uses n_embd / n_head
        q_scale = 1.0 / math.sqrt(n_embd / n_head if n_layer == 62 else head_dim)
    else:
        q_scale = 1.0 / math.sqrt(head_dim)
    return RefConfig(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(get("feed_forward_length")),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_rot=n_rot,
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_style=ROPE_NORM if arch == "llama" else ROPE_NEOX,
        rope_base=rope_base,
        # llama.cpp hard-codes rope_freq_base_train_swa = 10000 for gemma3; honour an explicit key if present
        rope_base_swa=float(get("rope.freq_base_swa", 10000.0)) if gemma else rope_base,
        rope_freq_scale=freq_scale,
        activation="gelu_tanh" if gemma else "silu",
        embd_scale=math.sqrt(n_embd) if gemma else 1.0,
        q_scale=q_scale,
        qk_norm=arch in ("qwen3", "gemma3"),
        post_norms=gemma,
        n_swa=n_swa,
        swa_layers=swa_layers,
        final_softcap=float(get("final_logit_softcapping", 0.0) or 0.0),
    )


# ---------------------------------------------------------------------------------------------------
# Building blocks (all float64)
# ---------------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """x (..., d) float64 -> x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, n_rot, base, style, freq_scale=1.0, freq_factors=None):
    """Rotate the first n_rot dims of every head. x (n_tokens, n_heads, head_dim), positions (n_tokens,).

    ggml_rope_ext without YaRN: theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factors[i].
    NORM rotates the pairs (2i, 2i+1); NEOX rotates the pairs (i, i + n_rot/2).
    """
    half = n_rot // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)       # (half,)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    theta = positions[:, None].astype(np.float64) * freq_scale * inv_freq[None, :]  # (n_tokens, half)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]                  # (n_tokens, 1, half)
    out = x.copy()
    if style == ROPE_NORM:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    else:
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:n_rot] = x0 * sin + x1 * cos
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    """The tanh approximation of GELU (ggml_gelu; HF gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(q, k, v, q_scale, n_swa):
    """Causal (optionally sliding-window) GQA softmax attention over one sequence starting at pos 0.

    q (T, n_head, hd), k and v (T, n_head_kv, hd) -> (T, n_head * hd). Query head h reads kv head
    h // (n_head / n_head_kv) (llama.cpp broadcasts kv heads that way). With n_swa > 0, key j is hidden
    from query i when i - j >= n_swa (llama.cpp LLAMA_SWA_TYPE_STANDARD).
    """
    n_tokens, n_head, hd = q.shape
    group = n_head // k.shape[1]
    k_full = np.repeat(k, group, axis=1)                                  # (T, n_head, hd)
    v_full = np.repeat(v, group, axis=1)                                  # (T, n_head, hd)
    scores = np.einsum("ihd,jhd->hij", q * q_scale, k_full)               # (n_head, T, T)
    i = np.arange(n_tokens)[:, None]
    j = np.arange(n_tokens)[None, :]
    hidden = j > i
    if n_swa > 0:
        hidden |= (i - j) >= n_swa
    scores = np.where(hidden[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hij,jhd->ihd", probs, v_full)                        # (T, n_head, hd)
    return out.reshape(n_tokens, n_head * hd)


# OpenBLAS on one thread inside a block: on this 2-core machine shared by busy processes, OpenBLAS's
# spinning workers made a SmolLM2 pass 10x slower (20 s vs 1.9 s measured). Shared with the predictor.
from gguf_flash.flash.predictor import single_threaded_blas  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

class RefModel:
    """Weights dequantized on first use and cached: float64 for layers, float32 for embedding/head."""

    HEAD_CHUNK = 16384        # vocab rows converted to float64 at a time in the output projection

    def __init__(self, metadata: dict, tensors: dict, cache_weights: bool = True):
        self.metadata = metadata
        self.tensors = tensors
        self.config = _config(metadata)
        self.cache_weights = cache_weights
        self._cache = {}
        embd = tensors["token_embd.weight"]
        self.n_vocab = int(embd.ne[1])
        self.head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        # ffn_hook(il, act (T, n_ff), up (T, n_ff)) -> the act to use: a sparsity experiment's mask
        # (tools/bench_ref_sparsity.py); None: the dense model
        self.ffn_hook = None

    # -- weights ------------------------------------------------------------------------------------
    def has(self, name):
        return name in self.tensors

    def weight(self, name, dtype=np.float64):
        """Dequantized tensor in numpy order: (n_rows, n_cols) = (ne[1], ne[0]), or (ne[0],) for vectors."""
        key = (name, np.dtype(dtype).str)
        if key in self._cache:
            return self._cache[key]
        t = self.tensors[name]
        w = np.asarray(dequantize(t.data, t.qtype), dtype=dtype)
        w = w.reshape(tuple(reversed(t.ne)))
        if self.cache_weights or w.ndim == 1:
            self._cache[key] = w
        return w

    def linear(self, x, name):
        """x (T, n_in) @ W.T (+ bias): W stored (n_out, n_in), i.e. ggml ne = [n_in, n_out]."""
        y = x @ self.weight(f"{name}.weight").T
        if self.has(f"{name}.bias"):
            y = y + self.weight(f"{name}.bias")
        return y

    # -- forward ------------------------------------------------------------------------------------
    def logits(self, tokens, last_only: bool = False) -> np.ndarray:
        """One causal pass over `tokens` at positions 0..T-1.

        Returns (T, n_vocab) float64, or (1, n_vocab) for the last position if last_only.
        """
        with single_threaded_blas():
            return self._forward(tokens, last_only)

    def _forward(self, tokens, last_only):
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        n_tokens = tokens.size
        positions = np.arange(n_tokens)

        embd = self.weight("token_embd.weight", np.float32)                  # (n_vocab, n_embd) f32
        x = embd[tokens].astype(np.float64) * cfg.embd_scale                  # (T, n_embd)
        freq_factors = self.weight("rope_freqs.weight") if self.has("rope_freqs.weight") else None

        for il in range(cfg.n_layer):
            p = f"blk.{il}"
            # ---- attention
            h = rms_norm(x, self.weight(f"{p}.attn_norm.weight"), cfg.rms_eps)
            q = self.linear(h, f"{p}.attn_q").reshape(n_tokens, cfg.n_head, cfg.head_dim)
            k = self.linear(h, f"{p}.attn_k").reshape(n_tokens, cfg.n_head_kv, cfg.head_dim)
            v = self.linear(h, f"{p}.attn_v").reshape(n_tokens, cfg.n_head_kv, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, self.weight(f"{p}.attn_q_norm.weight"), cfg.rms_eps)
                k = rms_norm(k, self.weight(f"{p}.attn_k_norm.weight"), cfg.rms_eps)
            swa = cfg.swa_layers[il]
            base = cfg.rope_base_swa if swa else cfg.rope_base
            scale = 1.0 if swa else cfg.rope_freq_scale
            q = rope(q, positions, cfg.n_rot, base, cfg.rope_style, scale, freq_factors)
            k = rope(k, positions, cfg.n_rot, base, cfg.rope_style, scale, freq_factors)
            a = attention(q, k, v, cfg.q_scale, cfg.n_swa if swa else 0)     # (T, n_head * hd)
            a = self.linear(a, f"{p}.attn_output")                           # (T, n_embd)
            if cfg.post_norms:
                a = rms_norm(a, self.weight(f"{p}.post_attention_norm.weight"), cfg.rms_eps)
            x = x + a
            # ---- feed-forward: down(act(gate h) * up h)
            h = rms_norm(x, self.weight(f"{p}.ffn_norm.weight"), cfg.rms_eps)
            gate = self.linear(h, f"{p}.ffn_gate")                           # (T, n_ff)
            up = self.linear(h, f"{p}.ffn_up")                               # (T, n_ff)
            act = gelu_tanh(gate) if cfg.activation == "gelu_tanh" else silu(gate)
            if self.ffn_hook is not None:
                act = self.ffn_hook(il, act, up)
            f = self.linear(act * up, f"{p}.ffn_down")                       # (T, n_embd)
            if cfg.post_norms:
                f = rms_norm(f, self.weight(f"{p}.post_ffw_norm.weight"), cfg.rms_eps)
            x = x + f

        x = rms_norm(x, self.weight("output_norm.weight"), cfg.rms_eps)      # (T, n_embd)
        if last_only:
            x = x[-1:]
        return self._head(x)

    def _head(self, x):
        """x (T, n_embd) float64 -> (T, n_vocab) float64 through the f32-cached head, in chunks."""
        head = self.weight(self.head_name, np.float32)                       # (n_vocab, n_embd) f32
        out = np.empty((x.shape[0], self.n_vocab), dtype=np.float64)
        for start in range(0, self.n_vocab, self.HEAD_CHUNK):
            rows = head[start:start + self.HEAD_CHUNK].astype(np.float64)    # exact: f32 -> f64
            out[:, start:start + rows.shape[0]] = x @ rows.T
        if self.has("output.bias"):
            out += self.weight("output.bias")
        cap = self.config.final_softcap
        if cap > 0:
            out = cap * np.tanh(out / cap)
        return out


def load_reference(path=None, reader: GGUFReader | None = None, cache_weights: bool = True) -> RefModel:
    """Open a GGUF for the reference forward pass.

    path: read with the fast header parser (default). reader: use an already open gguf.GGUFReader.
    cache_weights: keep every dequantized layer weight (float64; 8 bytes per weight) on the object.
    """
    if reader is not None:
        metadata, tensors = _from_gguf_reader(reader)
    elif path is not None:
        src = _FastGGUF(path)
        metadata, tensors = src.metadata, src.tensors
    else:
        raise ValueError("load_reference needs a path or a GGUFReader")
    return RefModel(metadata, tensors, cache_weights=cache_weights)
