"""Prompt processing in chunks for flash and naive mode: every needed bundle read once per chunk.

Per layer, the chunk's tokens run attention one after the other (the decode kernels: token j's K/V at
this layer is all token j+1 needs), each token chooses its own neurons, and the FFN loader reads the
union of the chunk's neurons once (window + staging) and computes every token over its own active set
with the same kernel and in the same order as a token-by-token run: the logits are bitwise those of
feeding the prompt one token at a time (tests/test_flash_prefill.py), with each bundle read once per
chunk instead of once per token, and the output head run for the last token only. A union larger than
the window and the staging buffer is read in parts of ascending rows; each token computes the positions
whose rows are held, in order, into its own accumulators. FlexGen's zig-zag order and llama.cpp's micro-batches amortise reads the same way.
"""

from __future__ import annotations

import time
import numpy as np

from ..kernels import dispatch, forward as fw, nn
from .stats import ChunkStats

CHUNK = 64   # prompt tokens per chunk (the buffers below are counted in the plan)


def buffer_bytes(cfg, xq_bytes: int, chunk: int = CHUNK) -> int:
    """RSS of a ChunkPrefill's buffers: what the plan reserves for them."""
    import numba
    n_part = max(2, numba.get_num_threads())
    return chunk * (cfg.n_ff * 8 + cfg.n_embd * (12 + 4 * n_part) + xq_bytes + 8)


class ChunkPrefill:
    def __init__(self, model, chunk: int = CHUNK):
        c = model.cfg
        self.m, self.chunk = model, chunk
        self.X = np.zeros((chunk, c.n_embd), np.float32)       # (T, n_embd) residual stream per token
        self.XB = np.zeros((chunk, c.n_embd), np.float32)      # (T, n_embd) FFN input per token
        self.FOUT = np.zeros((chunk, c.n_embd), np.float32)    # (T, n_embd) FFN output per token
        xq = model.st.xq_embd.shape[0]
        self.XQ = np.zeros((chunk, xq), np.uint8)              # (T, q8x bytes) quantized FFN input
        self.ACT = np.zeros((chunk, c.n_ff), np.int32)         # (T, n_ff) each token's chosen rows
        self.GV = np.zeros((chunk, c.n_ff), np.float32)        # (T, n_ff) their gate values
        self.N = np.zeros(chunk, np.int64)                     # (T,) how many
        n_part = model.ffn.partial.shape[0]
        self.PART = np.zeros((chunk, n_part, c.n_embd), np.float32)  # (T, n_part, n_embd) accumulators

    def run(self, tokens, pos0: int) -> None:
        """Feed tokens at pos0..; the model's logits buffer ends with the last token's logits."""
        for start in range(0, len(tokens), self.chunk):
            self._chunk(tokens[start:start + self.chunk], pos0 + start,
                        last=start + self.chunk >= len(tokens))

    def _chunk(self, tokens, pos0, last):
        m = self.m
        c, w, s = m.cfg, m.w, m.st
        T = len(tokens)
        cs = ChunkStats(tokens=T)
        t_all = time.perf_counter()
        m.store.check_unchanged()
        for j, tok in enumerate(tokens):
            m.embed(self.X[j], tok, cs)
        eps = float(w.fp[fw.FP_EPS])
        sel = m.select
        for il in range(c.n_layer):
            for j in range(T):
                pos = pos0 + j
                nn.rope_cos_sin(s.cos[0], s.sin[0], pos, w.inv_freq[0])
                nn.rope_cos_sin(s.cos[1], s.sin[1], pos, w.inv_freq[1])
                s.x[:] = self.X[j]
                fw.attention_layer(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos,
                                   s.sin, s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases,
                                   w.swa, w.ip, w.fp, il, pos)
                self.X[j] = s.x
                nn.rmsnorm(self.XB[j], self.X[j], w.norms[il, fw.NORM_FFN], eps)
                dispatch.quantize_x(self.XQ[j], self.XB[j])
                n, have_gate = sel(il, s.hg, self.XB[j], self.XQ[j])
                self.ACT[j, :n] = sel.active[:n]
                self.GV[j, :n] = sel.gvals[:n]
                self.N[j] = n
            m.ffn.run_chunk(self.FOUT, il, self.ACT, self.GV, self.N, T, have_gate, self.XB, self.XQ,
                            c.activation, m.thresholds[il], m.t + T - 1, cs, self.PART)
            for j in range(T):
                fw.residual_add(self.X[j], self.FOUT[j], w.norms[il, fw.NORM_POST_FFW], eps, c.post_norms)
        s.x[:] = self.X[T - 1]
        if last:
            m.out_head(eps, cs)
        m.t += T
        cs.compute_ms = (time.perf_counter() - t_all) * 1e3 - cs.io_ms - cs.mm_ms
        m.prompt_stats.append(cs)
        m._watchdog()
