"""Prompt processing in chunks for flash and naive mode: every needed bundle read once per chunk and
computed for the whole chunk as a matrix product.

Per layer, a chunk of T prompt tokens runs attention as a batch (the dense engine's batched kernels,
fw.attention_batch_layer), then each token chooses its own neurons (the selector over the chunk: the
resident gate (and up) rows as one matrix product), and the FFN loader reads the union of the chunk's neurons
once (window + staging, in parts of ascending rows when it does not fit) and computes it with
sparse.sparse_ffn_chunk: each bundle decoded once, its dot products with every token's input as a
register-blocked matrix product, each token adding only the neurons it chose. So a token still uses
exactly its own active set (token-by-token flash up to float rounding: the matrix path decodes rows to
f32 where the decode path quantizes the input to 8 bits, tests/test_flash_prefill.py), the result is
the same at every cap (bitwise), and a 500-token prompt pays ~8 rounds of reads instead of 500.
The output head runs for the last token only, or for every token in groups (`rows`, perplexity),
reading a streamed head once per group. FlexGen's zig-zag order and llama.cpp's micro-batches amortise
reads the same way.
"""

from __future__ import annotations

import time

import numpy as np

from ..kernels import forward as fw, nn, sparse
from ..kernels.nn import batch_score_rows
from ..kernels.quant_basic import MM_ROWS
from ..model import lazy_zeros
from .stats import ChunkStats

CHUNK = 64   # prompt tokens per chunk (the buffers below are counted in the plan)


def _n_part() -> int:
    import numba
    return max(2, numba.get_num_threads())


def buffer_bytes(cfg, n_ctx: int, chunk: int = CHUNK) -> int:
    """RSS of a ChunkPrefill's buffers (the lazy attention scratch counted whole), without the gate
    values of a chunk (gate_bytes(): counted with the gate rows, the only selector that needs them)."""
    c, n_part = cfg, _n_part()
    per_tok = 4 * (3 * c.n_embd + 2 * c.q_dim + 2 * c.kv_dim + 2 * c.rope_dim
                   + n_part * (c.n_embd + 2 * MM_ROWS)) + c.n_ff
    return chunk * per_tok + 4 * (n_part * 3 * MM_ROWS * c.n_embd + c.n_ff + batch_score_rows() * n_ctx)


def gate_bytes(cfg, chunk: int) -> int:
    """The chunk's gate values (T, n_ff) f32, allocated when the gate rows are resident (the product
    selector's up values are as many more)."""
    return chunk * cfg.n_ff * 4


class ChunkBuffers:
    """Every array a prompt chunk of `chunk` tokens writes (the plan counts them: buffer_bytes). The
    kernel preload (runtime.preload_kernels) builds them for one token, so the kernels are loaded for
    exactly these array types."""

    def __init__(self, c, n_ctx: int, n_part: int, gate: bool, chunk: int = CHUNK, up: bool = False):
        f32, T = np.float32, chunk
        self.chunk = chunk
        self.X = np.zeros((T, c.n_embd), f32)          # (T, n_embd) residual stream per token
        self.XB = np.zeros((T, c.n_embd), f32)         # (T, n_embd) normed input (attention, FFN), FFN output
        self.XR = np.zeros((T, c.n_embd), f32)         # (T, n_embd) the same as 8-bit blocks (round_q8)
        self.HID = None                                # (T, n_embd) final normed hidden states (logit rows)
        self.Q = np.zeros((T, c.q_dim), f32)           # (T, q_dim); after attention: its output as 8-bit blocks
        self.ATR = self.Q
        self.K = np.zeros((T, c.kv_dim), f32)          # (T, kv_dim)
        self.V = np.zeros((T, c.kv_dim), f32)
        self.ATT = np.zeros((T, c.q_dim), f32)
        self.scores = lazy_zeros((batch_score_rows(), n_ctx))        # (QB x lanes, n_ctx) attention scratch
        self.cos = np.zeros((T, 2, c.rope_dim // 2), f32)           # (T, [global, local], rope_dim / 2)
        self.sin = np.zeros((T, 2, c.rope_dim // 2), f32)
        # (T, n_ff) gate values: only with resident gate rows (else one unused row)
        self.HG = np.zeros((T if gate else 1, c.n_ff), f32)
        # (T, n_ff) up values: only with resident up rows (the product selector)
        self.HU = np.zeros((T if up else 1, c.n_ff), f32)
        self.MK = np.zeros((T, c.n_ff), np.uint8)      # (T, n_ff) 1 where token j chose row i
        self.union = np.zeros(c.n_ff, np.int32)        # (n_ff,) rows some token chose, increasing
        self.PART = np.zeros((n_part, T, c.n_embd), f32)             # (n_part, T, n_embd) accumulators
        self.DEC = np.zeros((n_part, 3, MM_ROWS, c.n_embd), f32)     # decoded gate/up/down rows per part
        self.H = np.zeros((n_part, 2, T, MM_ROWS), f32)              # their gate/up dot products


class ChunkPrefill(ChunkBuffers):
    def __init__(self, model, chunk: int = CHUNK):
        super().__init__(model.cfg, model.n_ctx, model.ffn.partial.shape[0], model.selector in ("gate", "product"),
                         chunk, model.selector == "product")
        self.m = model

    def run(self, tokens, pos0: int) -> None:
        """Feed tokens at pos0..; the model's logits buffer ends with the last token's logits."""
        for start in range(0, len(tokens), self.chunk):
            self._chunk(tokens[start:start + self.chunk], pos0 + start, start + self.chunk >= len(tokens))

    def run_rows(self, tokens, pos0: int, out):
        """Feed tokens at pos0..; yields (start, logits (m <= r, n_vocab)) for every token, the head
        applied to r hidden states at a time (out (r, n_vocab) f32, reused)."""
        for start in range(0, len(tokens), self.chunk):
            self._chunk(tokens[start:start + self.chunk], pos0 + start, False)
            yield from self._rows(start, min(self.chunk, len(tokens) - start), out)

    def _rows(self, start, T, out):
        """Logits of the chunk's T positions from its final residual rows X: one row at a time through the
        decode head (out is the model's logits buffer), or r at a time as a matrix product (a streamed
        head read once per r rows; its kernel is loaded only for a model made with logit_rows > 1)."""
        m, r = self.m, out.shape[0]
        cs = m.prompt_stats[-1]
        eps = m.w.fp[fw.FP_EPS]
        if r == 1:
            for j in range(T):
                m.st.x[:] = self.X[j]
                m.out_head(eps, cs)
                yield start + j, out
            return
        if self.HID is None:
            self.HID = np.zeros((self.chunk, m.cfg.n_embd), np.float32)
        fw.rows_rmsnorm(self.HID[:T], self.X[:T], m.w.output_norm, eps)
        for j0 in range(0, T, r):
            n = min(r, T - j0)
            m.out_head.rows(self.HID[j0:j0 + n], out[:n], cs)
            yield start + j0, out[:n]

    def _chunk(self, tokens, pos0, last):
        m = self.m
        c, w = m.cfg, m.w
        T = len(tokens)
        X, XB, XR, HG, MK = self.X[:T], self.XB[:T], self.XR[:T], self.HG[:T], self.MK[:T]
        cs = ChunkStats(tokens=T)
        t_all = time.perf_counter()
        m.store.check_unchanged()
        for j, tok in enumerate(tokens):
            m.embed(X[j], tok, cs)
            nn.rope_cos_sin(self.cos[j, 0], self.sin[j, 0], pos0 + j, w.inv_freq[0])
            nn.rope_cos_sin(self.cos[j, 1], self.sin[j, 1], pos0 + j, w.inv_freq[1])
        eps = w.fp[fw.FP_EPS]
        s = m.st
        for il in range(c.n_layer):
            fw.attention_batch_layer(X, XB, XR, self.Q[:T], self.K[:T], self.V[:T], self.ATT[:T], self.ATR[:T],
                                     self.scores, s.k_cache, s.v_cache, self.cos, self.sin, w.blob, w.mats,
                                     w.norms, w.qk_norms, w.biases, w.swa, w.ip, w.fp, il, pos0, w.ts)
            fw.rows_rmsnorm(XB, X, w.norms[il, fw.NORM_FFN], eps)
            fw.rows_round_q8(XR, XB)
            known = m.select.chunk(il, HG, self.HU[:T], MK, XB, XR)
            n = sparse.union_rows(self.union, MK)
            # the FFN's output goes to XB: its sums are written once every part has used XB
            m.ffn.run_chunk(XB, il, self.union, n, MK, HG, known, XB, XR, c.activation, m.thresholds[il],
                            m.t + T - 1, cs, self)
            fw.rows_residual(X, XB, w.norms[il, fw.NORM_POST_FFW], eps, int(c.post_norms))
        s.x[:] = X[T - 1]
        if last:
            m.decode_head(eps, cs)
        m.t += T
        cs.compute_ms = (time.perf_counter() - t_all) * 1e3 - cs.io_ms - cs.mm_ms
        m.prompt_stats.append(cs)
        m._watchdog()
