"""Synthetic GGUF models with random weights: tiny ones for tests, large ones for benchmarks.

`write_synthetic` writes a GGUF file that llama.cpp-style loaders accept (the tensor names and metadata
keys of llama.cpp, see gguf-py `constants.py`: MODEL_TENSORS / Keys.LLM / Keys.Attention / Keys.Rope),
for the architectures `llama`, `qwen2`, `qwen3` and `gemma3`. Weights are random but deterministic:
`synthetic_weights(spec, name)` regenerates the float32 values of any tensor before quantization, so tests
can compare `gguf.quants.dequantize` of the file against them.

The file is streamed: header, KV data and tensor infos first, then one tensor at a time, each generated
and quantized in row chunks, so memory stays near one tensor in its file type (the token embedding)
however large the model is (`SHAPES["llama-7b"]` writes ~3.8 GB at Q4_0).

Metadata key of our own (not llama.cpp's): `{arch}.ffn_activation` = "silu" | "gelu" | "relu", the FFN
gate activation; the flash converter and the engine read it (llama.cpp ignores unknown keys).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, TokenType

from .atomic import atomic_output
from .errors import InvalidArgumentError, UnsupportedModelError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

ARCHES = ("llama", "qwen2", "qwen3", "gemma3")
NATIVE_ACTIVATION = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "gemma3": "gelu"}
ACTIVATIONS = ("silu", "gelu", "relu")
TOKENIZERS = ("gpt2", "llama")

QTYPES = {"F32": T.F32, "F16": T.F16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1,
          "Q5_0": T.Q5_0, "Q5_1": T.Q5_1}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}

# Published shapes (HF config.json of each model); random weights, real sizes.
SHAPES = {
    "tiny": dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=300),
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152,
                         n_ctx=8192, rope_freq_base=100000.0),
    "tinyllama-1.1b": dict(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000,
                           n_ctx=2048, tied=False),
    "llama-7b": dict(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000,
                     n_ctx=4096, tied=False),
    "qwen3-0.6b": dict(arch="qwen3", n_layer=28, n_embd=1024, n_ff=3072, n_head=16, n_head_kv=8,
                       head_dim=128, n_vocab=151936, n_ctx=4096, rope_freq_base=1000000.0),
    "qwen2-0.5b": dict(arch="qwen2", n_layer=24, n_embd=896, n_ff=4864, n_head=14, n_head_kv=2,
                       n_vocab=151936, n_ctx=4096, rope_freq_base=1000000.0),
    "gemma3-270m": dict(arch="gemma3", n_layer=18, n_embd=640, n_ff=2048, n_head=4, n_head_kv=1,
                        head_dim=256, n_vocab=262144, n_ctx=4096, rope_freq_base=1000000.0),
}

RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "gemma3": 1e-6}
ROW_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generated chunk; part of the seed scheme
NORM_NOISE = 0.1              # norm weights are 1 + 0.1 N(0,1): not all ones, so a missing norm shows
BIAS_STD = 0.5                # qwen2 q/k/v biases: large enough that forgetting them changes the output
LOGIT_STD = 3.0               # target std of the logits, so softmax is neither flat nor one-hot
HOT_F_MIN, HOT_F_MAX = 1e-3, 0.999  # clip of the target active frequency of a neuron


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic model's bytes. Dimensions use llama.cpp's names."""
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None        # None: n_embd // n_head
    n_vocab: int = 300
    n_ctx: int = 256
    qtype: str = "Q8_0"                # type of the 2-D weights; norms and biases are F32
    embd_qtype: str | None = None      # type of token_embd / output; None: qtype
    tied: bool = True                  # no output.weight: the head reuses token_embd
    activation: str | None = None      # None: the architecture's own (gemma3 gelu, others silu)
    rope_freq_base: float = 10000.0
    sliding_window: int | None = None  # gemma3 only; None: max(4, n_ctx // 4)
    seed: int = 0
    hot_alpha: float | None = None     # power-law exponent of the hot neurons; None: plain random
    tokenizer: str = "gpt2"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        fix = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.arch not in ARCHES:
            raise UnsupportedModelError(f"synthetic arch {self.arch!r}: choose one of {ARCHES}")
        if self.head_dim is None:
            fix("head_dim", self.n_embd // self.n_head)
        if self.activation is None:
            fix("activation", NATIVE_ACTIVATION[self.arch])
        if self.embd_qtype is None:
            fix("embd_qtype", self.qtype)
        if self.sliding_window is None and self.arch == "gemma3":
            fix("sliding_window", max(4, self.n_ctx // 4))
        for q in (self.qtype, self.embd_qtype):
            if q not in QTYPES:
                raise UnsupportedModelError(f"synthetic qtype {q!r}: choose one of {sorted(QTYPES)}")
        if self.activation not in ACTIVATIONS:
            raise InvalidArgumentError(f"activation {self.activation!r}: choose one of {ACTIVATIONS}")
        if self.tokenizer not in TOKENIZERS:
            raise InvalidArgumentError(f"tokenizer {self.tokenizer!r}: choose one of {TOKENIZERS}")
        if min(self.n_layer, self.n_embd, self.n_ff, self.n_head, self.n_head_kv, self.head_dim) < 1:
            raise InvalidArgumentError("every dimension must be at least 1")
        if self.n_head % self.n_head_kv:
            raise InvalidArgumentError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        block = max(gguf.GGML_QUANT_SIZES[QTYPES[q]][0] for q in (self.qtype, self.embd_qtype))
        for what, n in (("n_embd", self.n_embd), ("n_ff", self.n_ff), ("n_head*head_dim", self.n_q)):
            if n % block:
                raise InvalidArgumentError(f"{what} = {n} is not a multiple of the quant block ({block})")
        if self.n_vocab < _min_vocab(self.tokenizer):
            raise InvalidArgumentError(f"n_vocab {self.n_vocab} < {_min_vocab(self.tokenizer)} "
                                       f"(the {self.tokenizer} base vocabulary)")

    @property
    def n_q(self) -> int:  # width of q (= attn_output input)
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:  # width of k and v
        return self.n_head_kv * self.head_dim


def make_spec(shape: str | None = None, **overrides) -> SyntheticSpec:
    """A spec from a named shape in SHAPES plus overrides (None values are ignored)."""
    base = {}
    if shape is not None:
        if shape not in SHAPES:
            raise InvalidArgumentError(f"unknown shape {shape!r}: choose one of {sorted(SHAPES)}")
        base = dict(SHAPES[shape], name=shape)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SyntheticSpec(**base)


# ------------------------------------------------------------------------------------------------
# Tensors and their random values
# ------------------------------------------------------------------------------------------------

def tensor_specs(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...], T]]:
    """(GGUF name, numpy shape (rows, cols) = ggml ne reversed, ggml type), in file order."""
    q, e, f32 = QTYPES[spec.qtype], QTYPES[spec.embd_qtype], T.F32
    n, hd = spec.n_embd, spec.head_dim
    out = [("token_embd.weight", (spec.n_vocab, n), e)]
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (n,), f32))
        out += [(b + "attn_q.weight", (spec.n_q, n), q), (b + "attn_k.weight", (spec.n_kv, n), q),
                (b + "attn_v.weight", (spec.n_kv, n), q)]
        if spec.arch == "qwen2":
            out += [(b + "attn_q.bias", (spec.n_q,), f32), (b + "attn_k.bias", (spec.n_kv,), f32),
                    (b + "attn_v.bias", (spec.n_kv,), f32)]
        if spec.arch in ("qwen3", "gemma3"):
            out += [(b + "attn_q_norm.weight", (hd,), f32), (b + "attn_k_norm.weight", (hd,), f32)]
        out.append((b + "attn_output.weight", (n, spec.n_q), q))
        if spec.arch == "gemma3":
            out.append((b + "post_attention_norm.weight", (n,), f32))
        out += [(b + "ffn_norm.weight", (n,), f32), (b + "ffn_gate.weight", (spec.n_ff, n), q),
                (b + "ffn_up.weight", (spec.n_ff, n), q), (b + "ffn_down.weight", (n, spec.n_ff), q)]
        if spec.arch == "gemma3":
            out.append((b + "post_ffw_norm.weight", (n,), f32))
    out.append(("output_norm.weight", (n,), f32))
    if not spec.tied:
        out.append(("output.weight", (spec.n_vocab, n), e))
    return out


def _rng(spec: SyntheticSpec, name: str, chunk: int = 0) -> np.random.Generator:
    # One independent stream per (seed, tensor, row chunk): any chunk can be regenerated alone.
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode()), chunk])


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 1 else max(1, ROW_CHUNK_ELEMENTS // shape[1])


def _embd_std(spec: SyntheticSpec) -> float:
    # Runtime embedding entries are N(0, 1). Gemma multiplies the embedding row by sqrt(n_embd).
    return 1.0 / math.sqrt(spec.n_embd) if spec.arch == "gemma3" else 1.0


def _branch_scale(spec: SyntheticSpec) -> float:
    # Per-coordinate RMS of each residual branch (attention or FFN output). The residual stream grows with
    # depth until |x| ~ sqrt(n_embd) / 2 * |token embedding|, as in trained models. A tied head needs this:
    # logits = embd . rmsnorm(x) gives the input token itself a head start of sqrt(n_embd) * cos(e_t, x)
    # logit stds, ~2 here; with a small residual the model would only ever repeat its input token.
    return math.sqrt(spec.n_embd / (8.0 * spec.n_layer))


# Hot neurons (LLM in a flash, fig. 5: a power law of activation frequency). llama has no gate bias, so:
# 1. "massive activations" (Sun et al. 2024): K = n_embd / 64 fixed coordinates M of every token
#    embedding hold the constant HOT_E, and no branch writes to them (rows M of attn_output / ffn_down
#    are zero), so x[M] = HOT_E at every depth while the rest of the residual grows;
# 2. ffn_norm[M] of layer l = HOT_H * rms(x_l) / HOT_E, with rms(x_l) estimated from the scales above
#    (`_residual_rms`), so the normalized FFN input has h[M] ~ HOT_H at every depth;
# 3. gate row i is zero on M except beta_i / (K * HOT_H): gate_i . h = beta_i + z, z ~ N(0, ~1) from the
#    other coordinates. beta_i = z0 + Phi^-1(f_k) with f_k = (k + 1) ** -hot_alpha for the neuron of
#    rank k in `hot_order`, so P(gate_i . h > z0) ~ f_k: a power law in rank. z0 = 0 for relu (active
#    = relu > 0); z0 = 1 for silu/gelu, so that "active" = |act| > act(1) ~ 0.73-0.84 (`hot_threshold`)
#    lies above the negative lobe (|silu| <= 0.28), where cold neurons sit.
HOT_E = 4.0  # with K = n/64: the massive coordinates hold 20% of the embedding's energy
HOT_PRE_STD = 1.0
HOT_Z0 = {"relu": 0.0, "silu": 1.0, "gelu": 1.0}


def hot_threshold(spec: SyntheticSpec) -> float:
    """The threshold on |act(gate . h)| at which active frequencies follow the power law."""
    z = HOT_Z0[spec.activation]
    if spec.activation == "silu":
        return z / (1.0 + math.exp(-z))
    if spec.activation == "gelu":  # tanh approximation (ggml_gelu)
        return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    return z


def hot_dims(spec: SyntheticSpec) -> np.ndarray:
    """The massive coordinates M (sorted). (K,) int64"""
    k = max(1, spec.n_embd // 64)
    return np.sort(_rng(spec, "hot.dims").choice(spec.n_embd, k, replace=False))


def _hot_h(spec: SyntheticSpec) -> float:
    # h[M]: large enough that the gate entries beta / (K * HOT_H) stay within a few 1/sqrt(n) (quantizable)
    return max(1.0, 64.0 / math.sqrt(spec.n_embd))


def _residual_rms(spec: SyntheticSpec, layer: int) -> float:
    """Estimated runtime RMS of the residual stream at the FFN input of `layer` (hot mode)."""
    k, b2 = len(hot_dims(spec)), _branch_scale(spec) ** 2
    ffn_var = 1.0 if spec.arch == "gemma3" else 0.5  # gemma's post-norm fixes the branch RMS
    return math.sqrt(1.0 + k * HOT_E ** 2 / spec.n_embd + (layer + 1) * b2 + layer * b2 * ffn_var)


def hot_residual_sample(spec: SyntheticSpec, layer: int, n_tokens: int, rng) -> np.ndarray:
    """Residual-stream vectors like the model's at the FFN input of `layer` (the model the hot
    construction assumes: HOT_E on M, Gaussian elsewhere). (n_tokens, n_embd) float64"""
    m = hot_dims(spec)
    n, k = spec.n_embd, len(m)
    rest = math.sqrt((_residual_rms(spec, layer) ** 2 * n - k * HOT_E ** 2) / (n - k))
    x = rest * rng.standard_normal((n_tokens, spec.n_embd))
    x[:, m] = HOT_E
    return x


def hot_order(spec: SyntheticSpec, layer: int) -> np.ndarray:
    """Neuron ids of a layer, hottest first (a random permutation). (n_ff,) int64"""
    return _rng(spec, f"hot.order.{layer}").permutation(spec.n_ff)


def hot_bias(spec: SyntheticSpec, layer: int) -> np.ndarray:
    """Target gate pre-activation bias beta_i of each neuron (index = neuron id). (n_ff,) float32"""
    if spec.hot_alpha is None:
        return np.zeros(spec.n_ff, np.float32)
    rank = np.empty(spec.n_ff, np.int64)
    rank[hot_order(spec, layer)] = np.arange(spec.n_ff)
    freq = np.clip((rank + 1.0) ** -spec.hot_alpha, HOT_F_MIN, HOT_F_MAX)
    inv = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])
    return (HOT_Z0[spec.activation] + HOT_PRE_STD * inv(freq)).astype(np.float32)


def _chunk(spec: SyntheticSpec, name: str, shape: tuple[int, ...], c: int) -> np.ndarray:
    """Rows [c*R, (c+1)*R) of tensor `name` in float32 (R = _rows_per_chunk(shape))."""
    rows = _rows_per_chunk(shape)
    r0, r1 = c * rows, min(shape[0], (c + 1) * rows)
    g = _rng(spec, name, c)
    kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    n, hot = spec.n_embd, spec.hot_alpha is not None
    m = hot_dims(spec) if hot else np.zeros(0, np.int64)
    if len(shape) == 1:
        if name.endswith(".bias"):
            return BIAS_STD * g.standard_normal(r1 - r0, dtype=np.float32)
        level = 1.0
        if kind == "output_norm":  # tied logits = embd . (x_hat * w): std = embd_std * sqrt(n) * w
            level = LOGIT_STD / (_embd_std(spec) * math.sqrt(n))
        elif kind in ("post_attention_norm", "post_ffw_norm"):  # gemma3: branch RMS = norm weight
            level = _branch_scale(spec)
        w = (level * (1.0 + NORM_NOISE * g.standard_normal(r1 - r0))).astype(np.float32)
        if kind in ("post_attention_norm", "post_ffw_norm"):
            w[m] = 0.0  # branches do not write the massive coordinates
        elif kind == "ffn_norm":
            w[m] = _hot_h(spec) * _residual_rms(spec, layer) / HOT_E
        return w
    cols = shape[1]
    w = g.standard_normal((r1 - r0, cols), dtype=np.float32)  # (rows, cols) float32
    if kind in ("token_embd", "output"):
        w *= _embd_std(spec)
        if kind == "token_embd":
            w[:, m] = HOT_E * _embd_std(spec)
        return w
    std = 1.0 / math.sqrt(cols)  # normal(0, 1/sqrt(n_in)): unit-RMS outputs for unit-RMS inputs
    if kind in ("attn_output", "ffn_down") and spec.arch != "gemma3":
        std *= _branch_scale(spec)
    w *= std
    if kind in ("attn_output", "ffn_down"):
        sel = m[(m >= r0) & (m < r1)]
        w[sel - r0] = 0.0  # output rows M: branches do not write the massive coordinates
    elif kind == "ffn_gate" and hot:
        w[:, m] = (hot_bias(spec, layer)[r0:r1] / (len(m) * _hot_h(spec)))[:, None]
    return w


def synthetic_weights(spec: SyntheticSpec, name: str) -> np.ndarray:
    """The float32 values of tensor `name` before quantization (numpy shape, see tensor_specs)."""
    shape = {nm: s for nm, s, _ in tensor_specs(spec)}.get(name)
    if shape is None:
        raise InvalidArgumentError(f"no tensor {name!r} in this synthetic model")
    n_chunks = -(-shape[0] // _rows_per_chunk(shape))
    return np.concatenate([_chunk(spec, name, shape, c) for c in range(n_chunks)])


def _file_tensor(spec: SyntheticSpec, name: str, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    """The tensor as stored: generated and quantized chunk by chunk into one preallocated array."""
    rows = _rows_per_chunk(shape)
    if qtype == T.F32:
        out = np.empty(shape, np.float32)
    elif qtype == T.F16:
        out = np.empty(shape, np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape(shape, qtype), np.uint8)  # (rows, row bytes)
    for c in range(-(-shape[0] // rows)):
        out[c * rows:(c + 1) * rows] = gguf.quants.quantize(_chunk(spec, name, shape, c), qtype)
    return out


# ------------------------------------------------------------------------------------------------
# Tokenizers (small but runnable vocabularies)
# ------------------------------------------------------------------------------------------------

GPT2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")                         # ids 0, 1, 2 as in Llama 2
COMMON_WORDS = (" the", " and", " of", " to", " in", " is", " that", " it", " for", " with", "ing",
                " a", "er", "on", "re", "ed", "es", " be", " this", " you")
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                   "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _min_vocab(tokenizer: str) -> int:
    return len(GPT2_SPECIALS if tokenizer == "gpt2" else LLAMA_SPECIALS) + 256


def gpt2_byte_symbols() -> list[str]:
    """GPT-2 bytes_to_unicode: printable bytes map to themselves, the others to U+0100 upward."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    sym, extra = {}, 0
    for b in range(256):
        if b in keep:
            sym[b] = chr(b)
        else:
            sym[b] = chr(256 + extra)
            extra += 1
    return [sym[b] for b in range(256)]


def _letter_words(space: str):
    """Prefix-closed words: space+a..z, then length 2 (space+aa, aa, ...), length 3, ..."""
    import itertools
    for length in range(1, 8):
        for tup in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=length):
            s = "".join(tup)
            yield space + s
            if length > 1:
                yield s


def _grow(tokens: list[str], index: set[str], words, n_vocab: int, merges: list[str] | None):
    """Append words (and every prefix missing), each one merge = prefix + last symbol."""
    for w in words:
        for k in range(2, len(w) + 1):
            if len(tokens) >= n_vocab:
                return
            t = w[:k]
            if t not in index:
                tokens.append(t)
                index.add(t)
                if merges is not None:
                    merges.append(f"{w[:k - 1]} {w[k - 1]}")


def gpt2_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE: specials, the 256 byte symbols, then merged words. -> tokens, types, merges"""
    byte_sym = gpt2_byte_symbols()
    space = byte_sym[ord(" ")]  # 'Ġ'
    tokens = [*GPT2_SPECIALS, *byte_sym]
    index, merges = set(tokens), []
    words = [w.replace(" ", space) for w in COMMON_WORDS]
    _grow(tokens, index, words, n_vocab, merges)
    _grow(tokens, index, _letter_words(space), n_vocab, merges)
    types = [TokenType.CONTROL] * len(GPT2_SPECIALS) + [TokenType.NORMAL] * (len(tokens) - 3)
    return tokens, [int(t) for t in types], merges


def llama_vocab(n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """SentencePiece style: <unk> <s> </s>, <0x00>..<0xFF> (BYTE), then pieces with decreasing scores."""
    tokens = [*LLAMA_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    index = set(tokens)
    chars = ["▁", *"etaoinshrdlucmfwypvbgkjqxz", *"ETAOINSHRDLUCMFWYPVBGKJQXZ", *"0123456789",
             *".,!?'\"-:;()"]
    for ch in chars:
        if len(tokens) < n_vocab:
            tokens.append(ch)
            index.add(ch)
    _grow(tokens, index, [w.replace(" ", "▁") for w in COMMON_WORDS], n_vocab, None)
    _grow(tokens, index, _letter_words("▁"), n_vocab, None)
    types += [TokenType.NORMAL] * (len(tokens) - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, [int(t) for t in types], scores


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def _add_metadata(w: gguf.GGUFWriter, spec: SyntheticSpec) -> None:
    a = spec.arch
    w.add_type("model")
    w.add_name(spec.name or f"synthetic-{a}")
    w.add_string("general.description", "random weights (gguf_flash.synthetic), not a trained model")
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    w.add_uint32(f"{a}.context_length", spec.n_ctx)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    w.add_float32(f"{a}.rope.freq_base", spec.rope_freq_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", RMS_EPS[a])
    if a == "gemma3" or spec.head_dim != spec.n_embd // spec.n_head:
        w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
        w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    if a == "gemma3":  # llama.cpp hard-codes the pattern (every 6th layer global) and swa base 10000
        w.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    else:
        w.add_uint32(f"{a}.rope.dimension_count", spec.head_dim)
        w.add_uint32(f"{a}.vocab_size", spec.n_vocab)
    w.add_string(f"{a}.ffn_activation", spec.activation)  # our own key, see module docstring
    w.add_uint32("general.file_type", int(FILE_TYPES[spec.qtype]))
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    if spec.tokenizer == "gpt2":  # like SmolLM2: ChatML specials, no BOS added
        tokens, types, merges = gpt2_vocab(spec.n_vocab)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "smollm")
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        bos, eos, unk, pad = 1, 2, 0, 2
        w.add_string("tokenizer.chat_template", CHATML_TEMPLATE)
    else:  # like Llama 2 / Gemma: SentencePiece, BOS added
        tokens, types, scores = llama_vocab(spec.n_vocab)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        bos, eos, unk, pad = 1, 2, 0, 0
    n_pad = spec.n_vocab - len(tokens)  # only when the letter words run out (n_vocab > ~8e9)
    tokens += [f"<extra_{i}>" for i in range(n_pad)]
    types += [int(TokenType.USER_DEFINED)] * n_pad
    if spec.tokenizer == "llama":
        w.add_array("tokenizer.ggml.scores", scores + [-1e9] * n_pad)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.add_uint32("tokenizer.ggml.bos_token_id", bos)
    w.add_uint32("tokenizer.ggml.eos_token_id", eos)
    w.add_uint32("tokenizer.ggml.unknown_token_id", unk)
    w.add_uint32("tokenizer.ggml.padding_token_id", pad)


def write_synthetic(path, *, arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                    head_dim=None, n_vocab=300, n_ctx=256, qtype="Q8_0", tied=True, activation=None,
                    rope_freq_base=10000.0, seed=0, hot_alpha=None, tokenizer="gpt2", embd_qtype=None,
                    sliding_window=None, name="", spec: SyntheticSpec | None = None,
                    progress=None) -> Path:
    """Write a synthetic GGUF to `path` (via a temp file + rename) and return the path.

    The keyword arguments are the fields of SyntheticSpec (activation None = the architecture's own);
    or pass a ready `spec` (e.g. make_spec("tinyllama-1.1b", qtype="Q4_0")), which overrides them.
    progress(name, i, n_tensors) is called before each tensor is written.
    """
    if spec is None:
        spec = SyntheticSpec(arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                             n_head_kv=n_head_kv, head_dim=head_dim, n_vocab=n_vocab, n_ctx=n_ctx,
                             qtype=qtype, embd_qtype=embd_qtype, tied=tied, activation=activation,
                             rope_freq_base=rope_freq_base, sliding_window=sliding_window, seed=seed,
                             hot_alpha=hot_alpha, tokenizer=tokenizer, name=name)
    path = Path(path)
    specs = tensor_specs(spec)
    with atomic_output(path) as tmp:   # Ctrl-C / SIGTERM: removed; SIGKILL: swept by the next writer
        _write_file(tmp, spec, specs, progress)
    log.info("wrote synthetic %s model to %s (%d tensors)", spec.arch, path, len(specs))
    return path


def _write_file(tmp, spec, specs, progress):
    w = gguf.GGUFWriter(tmp, spec.arch)
    try:
        _add_metadata(w, spec)
        for name, shp, qtype in specs:
            if qtype in (T.F32, T.F16):
                dtype = np.float32 if qtype == T.F32 else np.float16
                w.add_tensor_info(name, shp, np.dtype(dtype), int(np.prod(shp)) * np.dtype(dtype).itemsize)
            else:
                bshape = gguf.quant_shape_to_byte_shape(shp, qtype)  # GGUFWriter wants the byte shape
                w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, shp, qtype) in enumerate(specs):
            if progress is not None:
                progress(name, i, len(specs))
            w.write_tensor_data(_file_tensor(spec, name, shp, qtype))  # one tensor in memory at a time
    finally:
        w.close()


__all__ = ["SyntheticSpec", "SHAPES", "ARCHES", "QTYPES", "make_spec", "tensor_specs", "synthetic_weights",
           "hot_dims", "hot_residual_sample", "hot_threshold", "hot_order", "hot_bias", "write_synthetic",
           "gpt2_vocab", "llama_vocab", "gpt2_byte_symbols"]
