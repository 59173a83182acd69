"""Decoding logits from the head index (flash/head_build.py; docs/flash-gguf.md "Head index").

Per token: the preview logits of every row and their mean (kernels/headidx.py, resident), then
  round 1: read the rows of the best previews (8, or top-k) and compute their exact logits;
  round 2: read every other row whose preview is above bar - margin x (best - mean preview), and
           compute them exactly (best: the best exact logit of round 1).
The bar is what the sampler needs: greedy, the best exact logit (an unread row cannot win); top-k,
the k-th best exact one of round 1 (an unread row cannot enter the top k); min-p, the best + ln(min_p)
(an unread row would be dropped); otherwise the best + T ln(MASS / n_vocab) (the unread rows hold less
than MASS of the probability at temperature T, T >= 1). Unread rows keep their preview values.
Greedy decoding uses the greedy margin, samplers margin_dist (head_build.py). Both are calibrated, not
proven (no top-1 miss on the converter's held-out states; margin_dist: and every row within
head_build.DELTA_DIST logits of the top read).
Exact logits (`--head exact`, perplexity, logits(), logprobs, a repetition penalty) read the whole head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels import dispatch, headidx, nn
from .head_build import HEAD_GAP_BYTES, ROUND1_ROWS, index_bytes
from .stats import add_read

MASS = 1e-3     # sampling without top-k / min-p: the unread rows' share of the probability, at most


@dataclass(frozen=True)
class HeadNeed:
    """What the next token's sampler needs from the head."""
    kind: str = "exact"         # exact | greedy | sample
    top_k: int = 0
    min_p: float = 0.0
    temperature: float = 1.0


EXACT = HeadNeed()


def need_for(params) -> HeadNeed:
    """The HeadNeed of sampling.SamplingParams: a repetition penalty changes read logits after the fact
    (the bar would be set on values the sampler then lowers), so it asks for the exact head."""
    if params.repeat_penalty != 1.0:
        return EXACT
    if params.temperature <= 0.0:
        return HeadNeed("greedy")
    return HeadNeed("sample", int(params.top_k), float(params.min_p), float(params.temperature))


def index_ram(n_vocab: int, n_embd: int, rank: int) -> int:
    """RAM of the index as held (head_build.index_bytes) plus its per-token scratch: the rows to read
    (int32), read marks (uint8), block sums and y."""
    return index_bytes(n_vocab, n_embd, rank) + 5 * n_vocab + 4 * (n_vocab // headidx.PV_BLOCK + 1 + rank)


def _copy(a, dtype=None):
    c = np.array(a, dtype=dtype) if dtype is not None else np.array(a)
    c.flags.writeable = False
    return c


class IndexedHead:
    """Decoding logits from the index (a HeadNeed other than EXACT); the streamed head (OutputHead)
    reads the rows it asks for. Row ids are the head's stored rows (the preview is in that order); the
    logits end in token order."""

    def __init__(self, w, st, hi: dict, streamed):
        self.w, self.st, self.head = w, st, streamed
        self.store = streamed.store
        V = int(w.output[1])
        self.margin = float(hi["margin"])                                  # greedy
        self.margin_dist = float(hi["margin_dist"])                        # samplers
        # copies, not views of the file map (flash/pinned.py: a truncated file is then a read error)
        self.basis = _copy(hi["basis"], np.float32)                        # (r, n_embd)
        self.preview = _copy(hi["preview"], np.int8)                       # (n_vocab, r)
        self.scale = _copy(np.asarray(hi["scale"]).view(np.uint16))        # (n_vocab,) f16 bits
        r = self.basis.shape[0]
        self.part = np.zeros(V // headidx.PV_BLOCK + 1, np.float32)   # per-block sums of the previews
        self.ids = np.zeros(V, np.int32)               # (n_vocab,) rows to read
        self.mark = np.zeros(V, np.uint8)              # (n_vocab,) 1: read this token
        self.y = np.zeros(r, np.float32)
        self.first = np.zeros(max(ROUND1_ROWS, 1), np.int32)
        self.best = np.zeros(max(ROUND1_ROWS, 1), np.int32)
        self.qt = int(w.output[3])                     # the head's ggml type
        self.n_vocab = V

    def __call__(self, eps, ts, need: HeadNeed):
        w, s = self.w, self.st
        lg = self.head.logits             # (n_vocab,) in the head's stored row order
        nn.rmsnorm(s.xb, s.x, w.output_norm, eps)
        dispatch.quantize_x(s.xq_embd, s.xb)
        mean = float(headidx.preview_logits(lg, self.part, self.y, s.xb, self.basis, self.preview,
                                            self.scale))
        m = max(ROUND1_ROWS, need.top_k if need.kind == "sample" else 0)
        if self.first.shape[0] < m:
            self.first, self.best = np.zeros(m, np.int32), np.zeros(m, np.int32)
        n1 = headidx.top_rows(self.first, self.best[:m], lg)
        first = self.first[:n1]
        self._read(first, ts)
        best = float(lg[first].max())
        bar = best
        if need.kind == "sample":
            bars = []
            if need.top_k > 0:
                bars.append(float(headidx.kth_largest(lg, first, need.top_k)))
            if need.min_p > 0.0:
                bars.append(best + math.log(need.min_p))
            if not bars:
                bars.append(best + max(need.temperature, 1.0) * math.log(MASS / self.n_vocab))
            bar = max(bars)
        margin = self.margin_dist if need.kind == "sample" else self.margin
        thr = bar - margin * max(best - mean, 0.0)
        n2 = headidx.rows_above(self.ids, lg, np.float32(thr), self.mark)
        self._read(self.ids[:n2], ts)
        headidx.clear_marks(self.mark, first)
        headidx.clear_marks(self.mark, self.ids[:n2])
        ts.head_rows = n1 + n2
        if self.head.order is not None:
            self.head.order.to_tokens(s.logits)

    def _read(self, ids, ts):
        """Exact logits of rows `ids` (increasing), read in pieces of the streamed head's buffer."""
        h = self.head
        o = h.w.output
        self.store.select(int(o[0]), int(o[2]), int(o[1]))
        step = h.buf.shape[0]
        s, lg = self.st, self.head.logits
        for k0 in range(0, ids.shape[0], step):
            piece = ids[k0:k0 + step]
            n = piece.shape[0]
            add_read(ts, self.store.read_rows(piece, h.buf, h.idx[:n], HEAD_GAP_BYTES), head=True)
            headidx.exact_rows(lg, self.mark, piece, h.buf[:n], self.qt, s.xb, s.xq_embd, self.w.ts)
