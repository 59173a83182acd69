"""The dense model run layer-major over many sequences at once (FlexGen's zig-zag order), for the converter.

Token-major (model.prefill) runs every layer for one batch of tokens, so every weight page of the model is
touched while a chunk runs and the converter's RSS grows with the model. Here the hidden states of all the
sequences move through the model one layer at a time: layer il's weights are read once, used for every
token, and their mapped pages released (GGUFFile.release) before layer il + 1, so the resident weights are
about one layer, whatever the model's size. The compiled steps are the ones forward_batch runs
(kernels/forward.py: batch_embed, attention_batch_layer, ffn_batch_layer), so the states equal the
token-major pass's up to float rounding (tests/test_layerwise.py).

    X     (T, n_embd) f32       every sequence's residual stream, the sequences' rows one after another
    cos, sin (T, 2, rope_dim/2)  their RoPE tables
    H     (T, n_embd) f32       the final normed states (output_norm), what the head reads

A sequence that runs once (calibration text, held-out text) uses the model's own KV cache for the layer at
hand, whose pages are released with the layer's weights; a sequence that goes on (greedy continuations)
has a KV cache of its own, kept between steps (`Sequence.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..anon import release
from ..kernels import dispatch, forward as fw
from ..model import lazy_zeros
from ..perplexity import rows_nll


@dataclass
class Sequence:
    tokens: np.ndarray              # (n,) int64: the tokens this step feeds
    pos0: int = 0                   # position of tokens[0]
    cache: tuple | None = None      # (k_cache, v_cache) (n_layer, n_ctx, kv_dim) kept between steps; None: one step


def release_slab(arr: np.ndarray, il: int) -> None:
    """Give the whole pages of arr[il] back to the OS (arr from model.lazy_zeros: an anonymous map)."""
    import mmap
    m = arr.base
    while m is not None and not isinstance(m, mmap.mmap):
        m = getattr(m, "base", None) if not isinstance(m, memoryview) else m.obj
    if m is None:
        return
    n = arr[0].nbytes
    release(m, il * n, n)


class LayerPass:
    """Layer-major forward passes of a dense `Model` (model.py) over lists of `Sequence`s.

    release: drop each layer's mapped weight pages (and the one-step KV cache's) after the layer, so the
    resident weights stay about one layer; without it the pass keeps what it read, like model.prefill."""

    def __init__(self, model, release: bool = True):
        self.model, self.release = model, release
        f, c = model.file, model.cfg
        self.spans = []                                  # (offset, n_bytes) of each layer's tensors
        for il in range(c.n_layer):
            infos = [t for name, t in f.tensors.items() if name.startswith(f"blk.{il}.")]
            lo = min(t.offset for t in infos)
            self.spans.append((lo, max(t.offset + t.n_bytes for t in infos) - lo))
        self.head_info = f.tensor("output.weight" if "output.weight" in f.tensors else "token_embd.weight")
        self.embd_info = f.tensor("token_embd.weight")
        self.no_capture = np.zeros((0, 1, c.n_embd), np.float32)

    def _drop(self, offset, n_bytes):
        if self.release:
            self.model.file.release(offset, n_bytes)

    def run(self, seqs, thresholds=None, ffn_scale=None, on_layer=None, capture: bool = False) -> np.ndarray:
        """H (sum of the sequences' tokens, n_embd) f32: each sequence's new tokens through every layer.
        thresholds (n_layer,) / ffn_scale (n_layer, n_ff) as in kernels/forward.ffn_batch_layer (None:
        dense). capture: on_layer(il, Xl) is called after each layer with Xl (T, n_embd) f32, the layer's
        FFN inputs of every token (valid until the call returns), while the layer's pages are resident."""
        X, rope = self.embed(seqs)
        self.layers(seqs, X, rope, 0, self.model.cfg.n_layer, thresholds, ffn_scale, on_layer, capture)
        return self.final(X)

    def embed(self, seqs) -> tuple[np.ndarray, tuple]:
        """(X (T, n_embd) f32 the sequences' token embeddings, rows one sequence after another; (cos, sin)
        (T, 2, rope_dim/2) their RoPE tables), what `layers` takes."""
        m, c = self.model, self.model.cfg
        w = m.w
        rows = np.cumsum([0] + [len(q.tokens) for q in seqs])
        T = int(rows[-1])
        X = np.zeros((T, c.n_embd), np.float32)
        cos = np.zeros((T, 2, c.rope_dim // 2), np.float32)
        sin = np.zeros_like(cos)
        for q, a in zip(seqs, rows[:-1]):
            toks = np.asarray(q.tokens, np.int64)
            fw.batch_embed(X[a:a + len(toks)], cos[a:a + len(toks)], sin[a:a + len(toks)], w.blob, w.embd,
                           w.inv_freq, w.fp, toks, int(q.pos0), w.ts)
        self._drop(self.embd_info.offset, self.embd_info.n_bytes)
        return X, (cos, sin)

    def layers(self, seqs, X, rope, il0: int, il1: int, thresholds=None, ffn_scale=None, on_layer=None,
               capture: bool = False) -> None:
        """X (T, n_embd) f32, the residual stream entering layer il0, moved in place through layers
        il0 .. il1 - 1 (rope: embed's tables; the rest as in `run`). A one-step sequence's KV cache holds
        only the layer at hand, so a pass may start at any layer from the states entering it."""
        m, c = self.model, self.model.cfg
        w, s = m.w, m.st
        cos, sin = rope
        # contiguous float32: the compiled steps' one specialization (a column of a table would be another)
        thresholds = np.zeros(c.n_layer, np.float32) if thresholds is None else \
            np.ascontiguousarray(thresholds, np.float32)
        ffn_scale = np.zeros((0, c.n_ff), np.float32) if ffn_scale is None else \
            np.ascontiguousarray(ffn_scale, np.float32)
        rows = np.cumsum([0] + [len(q.tokens) for q in seqs])
        cap = np.zeros((len(X) if capture else 0, c.n_embd), np.float32)
        ub = s.n_ubatch
        for il in range(il0, il1):
            for q, a in zip(seqs, rows[:-1]):
                kc, vc = q.cache if q.cache is not None else (s.k_cache, s.v_cache)
                for j in range(0, len(q.tokens), ub):
                    n = min(ub, len(q.tokens) - j)
                    r = slice(a + j, a + j + n)
                    fw.attention_batch_layer(X[r], s.XB[:n], s.XB[:0], s.Q[:n], s.K[:n], s.V[:n], s.ATT[:n],
                                             s.ATT[:0], s.scores_b, kc, vc, cos[r], sin[r], w.blob, w.mats,
                                             w.norms, w.qk_norms, w.biases, w.swa, w.ip, w.fp, il,
                                             int(q.pos0) + j, w.ts)
                    fw.ffn_batch_layer(X[r], s.XB[:n], s.HG[:n], s.HU[:n], w.blob, w.mats, w.norms, w.ip, w.fp,
                                       il, thresholds, ffn_scale, cap[r][None] if capture else self.no_capture, 0, w.ts)
            if on_layer is not None:
                on_layer(il, cap)
            self._drop(*self.spans[il])
            if self.release:
                release_slab(s.k_cache, il)
                release_slab(s.v_cache, il)
        m._first_call("batch")

    def final(self, X) -> np.ndarray:
        """H (T, n_embd) f32: the final norm of the residual stream X after the last layer."""
        w = self.model.w
        H = np.empty_like(X)
        fw.rows_rmsnorm(H, X, w.output_norm, w.fp[fw.FP_EPS])
        return H

    def head_rows(self, H, out) -> None:
        """out (m, n_vocab) = the head applied to H (m, n_embd) (release_head() when done with it)."""
        dispatch.matmat(out, self.model.w.blob, self.model.w.output, H, self.model.w.ts)

    def release_head(self):
        self._drop(self.head_info.offset, self.head_info.n_bytes)

    def nll(self, seqs, thresholds=None, ffn_scale=None, rows: int = 32) -> tuple[float, int]:
        """(sum of -log p(next token), count) over one-step sequences from fresh contexts, as
        perplexity.chunk_nll scores each of them."""
        return self.states_nll(seqs, self.run(seqs, thresholds, ffn_scale), rows)

    def states_nll(self, seqs, H, rows: int = 32) -> tuple[float, int]:
        """`nll` of final states H (T, n_embd) f32 of the one-step sequences `seqs` (run's or final's)."""
        out = np.zeros((rows, self.model.cfg.n_vocab), np.float32)
        total, count, a = 0.0, 0, 0
        for q in seqs:
            toks = np.asarray(q.tokens, np.int64)
            for r in range(0, len(toks) - 1, rows):
                k = min(rows, len(toks) - 1 - r)
                self.head_rows(H[a + r:a + r + k], out[:k])
                step = max(1, (1 << 18) // out.shape[1])    # log-softmax temporaries of ~1 MiB
                for i in range(0, k, step):
                    total += rows_nll(out[i:min(k, i + step)], toks[r + 1 + i:r + 1 + min(k, i + step)])
                count += k
            a += len(toks)
        self.release_head()
        return total, count

    def greedy_states(self, prompts, n_new: int, kv_budget: int = 64 << 20) -> list:
        """Per prompt (list of token ids), (n_new, n_embd) f32: the normed final state of each token of
        its greedy continuation as it is fed (the states the head sees while decoding). The prompts
        decode in lockstep, as many at a time as have KV caches within kv_budget bytes, so each step
        reads the model's weights once for the group."""
        m, c = self.model, self.model.cfg
        kv = m.st.k_cache
        out = [None] * len(prompts)
        n_ctx = max(len(p) for p in prompts) + n_new + 1
        per = 2 * c.n_layer * n_ctx * kv.shape[2] * kv.dtype.itemsize
        group = max(1, int(kv_budget // per))
        logits = np.zeros((group, c.n_vocab), np.float32)
        for g0 in range(0, len(prompts), group):
            idx = list(range(g0, min(len(prompts), g0 + group)))
            caches = [(lazy_zeros((c.n_layer, n_ctx, kv.shape[2]), kv.dtype),
                       lazy_zeros((c.n_layer, n_ctx, kv.shape[2]), kv.dtype)) for _ in idx]
            seqs = [Sequence(np.asarray(prompts[i], np.int64), 0, cache) for i, cache in zip(idx, caches)]
            H = self.run(seqs)
            last = np.cumsum([len(q.tokens) for q in seqs]) - 1
            states = np.zeros((len(idx), n_new, c.n_embd), np.float32)
            for step in range(n_new):
                self.head_rows(np.ascontiguousarray(H[last]), logits[:len(idx)])
                self.release_head()
                nxt = logits[:len(idx)].argmax(axis=1)
                seqs = [Sequence(np.array([t], np.int64), len(prompts[i]) + step, cache)
                        for i, t, cache in zip(idx, nxt, caches)]
                H = self.run(seqs)
                last = np.arange(len(idx))
                states[:, step] = H
            for k, i in enumerate(idx):
                out[i] = states[k]
            del caches
        return out
