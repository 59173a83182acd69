"""Weights (read-only views into the mapped file), RunState (buffers allocated once), and Model.

llama2.c's three kinds of state: ModelConfig (config.py), Weights, RunState. `Model.forward` and
`Model.prefill` call one compiled function each (kernels/forward.py) and allocate nothing per token.
"""

from __future__ import annotations

import numpy as np

from .anon import anon_map
from .config import ModelConfig, config_from_gguf
from .errors import ContextOverflowError, GGUFFormatError, InvalidArgumentError, UnsupportedModelError
from .gguf_file import GGUFFile
from .kernels import dispatch, forward as fw, release_compiler_pages
from .kernels.kvcache import KV_TYPES
from .kernels.nn import batch_score_rows
from .kernels.quant_basic import q8x_scratch_bytes

MAT_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORM_NAMES = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")
N_UBATCH = 128  # prompt tokens per compiled batch call (bounds the batch buffers)


def weight_desc(f: GGUFFile, name: str, n_cols: int | None = None) -> np.ndarray:
    """(offset, n_rows, row_bytes, qtype) int64 of a 2-D weight, checking its type and row length."""
    info = f.tensor(name)
    if info.qtype not in dispatch.SUPPORTED:
        raise UnsupportedModelError(f"{f.path}: tensor {name} has type {info.type_name}, "
                                    f"which this engine does not implement")
    if n_cols is not None and info.ne[0] != n_cols:
        raise GGUFFormatError(f"{f.path}: tensor {name} has rows of {info.ne[0]}, expected {n_cols}")
    return np.array([info.offset, info.n_rows, info.row_bytes, info.qtype], dtype=np.int64)


class Weights:
    """Read-only views into the GGUF file plus small float32 copies of norms and biases."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, ffn: bool = True):
        c = cfg
        self.blob = f._mm                                           # (file_size,) uint8, read-only map
        self.mats = np.full((c.n_layer, 7, 4), -1, dtype=np.int64)  # (n_layer, 7, 4) see forward.py
        self.norms = np.zeros((c.n_layer, 4, c.n_embd), np.float32)  # (n_layer, 4, n_embd)
        self.qk_norms = np.zeros((c.n_layer, 2, c.head_dim), np.float32)
        self.biases = np.zeros((c.n_layer, 3, c.q_dim), np.float32)
        cols = (c.n_embd, c.n_embd, c.n_embd, c.q_dim, c.n_embd, c.n_embd, c.n_ff)
        for il in range(c.n_layer):
            p = f"blk.{il}."
            for j, name in enumerate(MAT_NAMES):
                if j >= fw.MAT_GATE and not ffn:
                    continue
                self.mats[il, j] = weight_desc(f, p + name + ".weight", cols[j])
            self.norms[il, 0] = f.array(p + "attn_norm.weight")
            self.norms[il, 1] = f.array(p + "ffn_norm.weight")
            if c.post_norms:
                self.norms[il, 2] = f.array(p + "post_attention_norm.weight")
                self.norms[il, 3] = f.array(p + "post_ffw_norm.weight")
            if c.qk_norm:
                self.qk_norms[il, 0] = f.array(p + "attn_q_norm.weight")
                self.qk_norms[il, 1] = f.array(p + "attn_k_norm.weight")
            if c.qkv_bias:
                self.biases[il, 0, :c.q_dim] = f.array(p + "attn_q.bias")
                self.biases[il, 1, :c.kv_dim] = f.array(p + "attn_k.bias")
                self.biases[il, 2, :c.kv_dim] = f.array(p + "attn_v.bias")
        self.embd = weight_desc(f, "token_embd.weight", c.n_embd)
        self.output = self.embd if c.tied_output else weight_desc(f, "output.weight", c.n_embd)
        # a copy, not a view of the file map (a truncated file must not fault under a running model),
        # read-only like the map's arrays: the compiled kernels' type for it stays the same
        self.output_norm = np.array(f.array("output_norm.weight"), dtype=np.float32)
        self.output_norm.flags.writeable = False
        # RoPE frequencies: [global, local]; llama3-style rope_freqs divide them
        half = c.rope_dim // 2
        i = np.arange(half, dtype=np.float64)
        factors = np.asarray(f.array("rope_freqs.weight"), np.float64) if c.rope_freqs else np.ones(half)
        self.inv_freq = np.stack([c.rope_base ** (-2 * i / c.rope_dim) / factors,
                                  c.rope_base_local ** (-2 * i / c.rope_dim) / factors]).astype(np.float32)
        self.swa = np.array(c.swa_layers, dtype=np.int64)
        self.ip = np.zeros(13, np.int64)
        self.ip[[fw.IP_N_LAYER, fw.IP_N_EMBD, fw.IP_N_FF, fw.IP_N_HEAD, fw.IP_N_HEAD_KV, fw.IP_HEAD_DIM,
                 fw.IP_ROPE_STYLE, fw.IP_ACT, fw.IP_WINDOW, fw.IP_QK_NORM, fw.IP_QKV_BIAS,
                 fw.IP_POST_NORMS, fw.IP_N_VOCAB]] = (
            c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.rope_style, c.activation,
            c.sliding_window, c.qk_norm, c.qkv_bias, c.post_norms, c.n_vocab)
        self.fp = np.array([c.rms_eps, c.attn_scale, c.embd_scale], np.float32)
        self.thresholds = np.zeros(c.n_layer, np.float32)   # (n_layer,) FFN thresholds; zeros = dense
        # (n_layer, n_ff) f32 per-neuron scales of the product criterion (the converter's search for
        # the product selector's thresholds); 0 layers: the gate criterion
        self.ffn_scale = np.zeros((0, c.n_ff), np.float32)
        self.no_capture = np.zeros((0, 1, c.n_embd), np.float32)
        # the type set every kernel call gets (kernels/dispatch.py): only these types' kernels are compiled
        self.ts = dispatch.type_set([int(t) for t in self.mats[:, :, 3].ravel() if t >= 0]
                                    + [int(self.embd[3]), int(self.output[3])])


def kv_dtype(kv_type: str):
    """-ctk/-ctv name ('f16', llama.cpp's default, or 'f32') -> the KV cache's storage dtype."""
    if kv_type not in KV_TYPES:
        raise InvalidArgumentError(f"KV cache type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")
    return KV_TYPES[kv_type]


def set_threads(n_threads: int | None) -> None:
    """Compute threads for the parallel kernels (None or 0: numba's default, all cores)."""
    if n_threads:
        import numba
        numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))


CACHE_LINE = 64


def line_zeros(shape, dtype=np.float32) -> np.ndarray:
    """np.zeros whose data starts on a cache line (np.zeros gives 16-byte alignment: 0, 16, 32 or 48
    bytes into a line). The row kernels load and store 64-byte vectors of their input and accumulator;
    misaligned, every one spans two lines: the Q8_0 down part's axpy took 34-35 ns a row against 27
    (SmolLM2, in cache, one thread), the bundle FFN 7-9% longer."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    buf = np.zeros(n + CACHE_LINE, np.uint8)
    off = -buf.ctypes.data % CACHE_LINE
    return buf[off:off + n].view(dt).reshape(shape)


THREAD_GAP = 32   # float32s (two cache lines) between the threads' rows (thread_rows)


def thread_rows(n_rows: int, n: int) -> np.ndarray:
    """(n_rows, >= n + THREAD_GAP) float32 zeros on cache lines, for accumulators that each thread adds
    into many times: thread c uses row c, [:n]. Rows packed end to end (line_zeros) each started on a
    line of their own, yet the hardware prefetchers of the core that walks row c-1 fetch the first lines
    of row c, and the two cores fought for them on every row of the sparse FFN's axpy: SmolLM2's product
    rows, 2 threads, in cache (tools/bench_sparse.py), 39-42 ns a row with packed rows, 24.5-25.5 with a gap
    of 2 lines or more (1, 16 floats: 30-35), the same as 4 parts on 2 threads, whose neighbours were
    not in use at the same time."""
    stride = -(-n // 16) * 16 + THREAD_GAP
    return line_zeros((n_rows, stride))


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zero array whose pages become resident only where written, one 4 KiB page at a time.
    np.zeros gets the same lazy pages, but with transparent huge pages on, writing the first row of each
    layer's KV slab faulted in a whole 2 MiB page per layer: 58 MiB per cache at -c 4096 for 3 tokens
    (anon_map asks for no huge pages)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = anon_map(n)
    return np.frombuffer(m, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class RunState:
    """Every buffer the forward pass writes, allocated once for a context of n_ctx tokens.
    The KV cache is lazy: pages become resident only as positions are used."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, n_ubatch: int = N_UBATCH, kv_type: str = "f16"):
        c, f32 = cfg, np.float32
        self.n_ctx = n_ctx
        # the decode step's vectors start on cache lines (line_zeros)
        self.x = line_zeros(c.n_embd)                    # (n_embd,) residual stream
        self.xb = line_zeros(c.n_embd)                   # (n_embd,) scratch
        self.q = line_zeros(c.q_dim)                     # (n_head * head_dim,)
        self.k = line_zeros(c.kv_dim)                    # (n_head_kv * head_dim,)
        self.v = line_zeros(c.kv_dim)
        self.att = line_zeros(c.q_dim)
        self.scores = np.zeros((c.n_head, n_ctx), f32)   # (n_head, n_ctx)
        self.hg = line_zeros(c.n_ff)                     # (n_ff,) gate activations
        self.hu = line_zeros(c.n_ff)                     # (n_ff,) up
        self.cos = np.zeros((2, c.rope_dim // 2), f32)   # [global, local]
        self.sin = np.zeros((2, c.rope_dim // 2), f32)
        self.logits = np.zeros(c.n_vocab, f32)
        self.xq_embd = line_zeros(q8x_scratch_bytes(c.n_embd), np.uint8)  # quantized input vectors
        self.xq_q = line_zeros(q8x_scratch_bytes(c.q_dim), np.uint8)
        self.xq_ff = line_zeros(q8x_scratch_bytes(c.n_ff), np.uint8)
        kv = kv_dtype(kv_type)
        self.k_cache = lazy_zeros((c.n_layer, n_ctx, c.kv_dim), kv)  # (n_layer, n_ctx, kv_dim) f16 bits or f32
        self.v_cache = lazy_zeros((c.n_layer, n_ctx, c.kv_dim), kv)
        # prompt batch buffers (n_ubatch rows)
        b = n_ubatch
        self.n_ubatch = b
        self.X = np.zeros((b, c.n_embd), f32)
        self.XB = np.zeros((b, c.n_embd), f32)
        self.Q = np.zeros((b, c.q_dim), f32)
        self.K = np.zeros((b, c.kv_dim), f32)
        self.V = np.zeros((b, c.kv_dim), f32)
        self.ATT = np.zeros((b, c.q_dim), f32)
        self.HG = np.zeros((b, c.n_ff), f32)
        self.HU = np.zeros((b, c.n_ff), f32)
        self.H = np.zeros((b, c.n_embd), f32)            # final normed hidden states
        self.scores_b = lazy_zeros((batch_score_rows(), n_ctx))   # (QB x lanes, n_ctx) attention_batch scratch
        self.cos_b = np.zeros((b, 2, c.rope_dim // 2), f32)
        self.sin_b = np.zeros((b, 2, c.rope_dim // 2), f32)


class Model:
    """A dense model on a GGUF file. `forward(token, pos)` -> logits; `prefill(tokens, pos0)`."""

    def __init__(self, f: GGUFFile, n_ctx: int | None = None, n_threads: int | None = None,
                 kv_type: str = "f16"):
        self.file = f
        self.cfg = config_from_gguf(f)
        self.n_ctx = int(n_ctx) if n_ctx else min(4096, self.cfg.n_ctx_train)
        self.w = Weights(f, self.cfg)
        self.st = RunState(self.cfg, self.n_ctx, kv_type=kv_type)
        set_threads(n_threads)
        self._loaded: set = set()   # compiled entry points called so far

    def _first_call(self, kind: str) -> None:
        """After the first call of each compiled entry point its kernels are loaded: LLVM's code pages
        go back to the OS (kernels.release_compiler_pages, ~70 MiB of RSS)."""
        if kind not in self._loaded:
            self._loaded.add(kind)
            release_compiler_pages()

    def _check_pos(self, pos: int, n: int = 1):
        if pos < 0 or pos + n > self.n_ctx:
            raise ContextOverflowError(f"{self.file.path}: {pos + n} tokens do not fit the context of "
                                       f"{self.n_ctx} (use -c to enlarge it)")

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (n_vocab,) f32 for `token` at `pos` (a view of a buffer reused next call)."""
        self._check_pos(pos)
        w, s = self.w, self.st
        fw.forward_token(s.logits, s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.hg, s.hu,
                         s.k_cache, s.v_cache, s.cos, s.sin, s.xq_embd, s.xq_q, s.xq_ff,
                         w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa, w.inv_freq, w.embd, w.output, w.output_norm, w.thresholds,
                         w.ip, w.fp, int(token), int(pos), w.ts)
        self._first_call("token")
        return s.logits

    def prefill(self, tokens, pos0: int = 0, logits_rows: str = "last"):
        """Run tokens through the model in batches of N_UBATCH, filling the KV cache.
        logits_rows: "last" -> logits (n_vocab,) of the last token; "all" -> a generator of
        (start, logits (m, n_vocab)) chunks, so perplexity never holds n_tok x n_vocab at once."""
        tokens = np.asarray(tokens, dtype=np.int64)
        self._check_pos(pos0, len(tokens))
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab):
            raise GGUFFormatError(f"{self.file.path}: token id out of range 0..{self.cfg.n_vocab - 1}")
        if logits_rows == "all":
            return self._prefill_all(tokens, pos0)
        for start in range(0, len(tokens), self.st.n_ubatch):
            self._batch(tokens[start:start + self.st.n_ubatch], pos0 + start)
        n = len(tokens) - 1 - (len(tokens) - 1) // self.st.n_ubatch * self.st.n_ubatch
        self.head(self.st.H[n:n + 1], self.st.logits[None, :])
        return self.st.logits

    def _prefill_all(self, tokens, pos0, rows: int = 32):
        """Yields (start, logits (m <= rows, n_vocab)): the head runs on `rows` hidden states at a time,
        so a 262,144-token vocabulary costs 32 MB here, not n_ubatch x n_vocab floats."""
        out = np.zeros((rows, self.cfg.n_vocab), np.float32)
        for start in range(0, len(tokens), self.st.n_ubatch):
            chunk = tokens[start:start + self.st.n_ubatch]
            self._batch(chunk, pos0 + start)
            for r in range(0, len(chunk), rows):
                m = min(rows, len(chunk) - r)
                self.head(self.st.H[r:r + m], out[:m])
                yield start + r, out[:m]

    def _batch(self, tokens, pos0, ffn_in=None):
        w, s = self.w, self.st
        fw.forward_batch(s.H, s.X, s.XB, s.Q, s.K, s.V, s.ATT, s.scores_b, s.HG, s.HU,
                         s.k_cache, s.v_cache, s.cos_b, s.sin_b, w.blob, w.mats, w.norms, w.qk_norms,
                         w.biases, w.swa, w.inv_freq, w.embd, w.output_norm, w.thresholds,
                         w.ffn_scale, w.no_capture if ffn_in is None else ffn_in, w.ip, w.fp, tokens, int(pos0), w.ts)
        self._first_call("batch")

    def head(self, hidden, out):
        """out (m, n_vocab) = output head applied to normed hidden rows (m, n_embd)."""
        dispatch.matmat(out, self.w.blob, self.w.output, hidden, self.w.ts)
        self._first_call("head")
