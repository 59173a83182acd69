"""The output head and the token embedding under a cap: resident (views into the file map, touched
every token) or read through the bundle store (O_DIRECT when cold) into small reused buffers.

A streamed head is read in HEAD_CHUNK pieces, each multiplied as it arrives, so it never holds more
than one chunk in RSS and its reads count in the token's I/O (a first version read it from the file
map and released the pages with madvise; the page cache then held the head for free). An embedding
that is not resident is read one row per token (an untied 89 MiB Qwen table is never counted whole).
"""

from __future__ import annotations

import numpy as np

from ..kernels import dispatch, forward as fw, nn
from .plan import HEAD_CHUNK
from .stats import add_read


def _readonly_view(buf: np.ndarray) -> np.ndarray:
    """A flat read-only view: the type the compiled kernels were loaded for (the file map's)."""
    v = buf.reshape(-1).view()
    v.flags.writeable = False
    return v


class OutputHead:
    """logits = W_out @ RMSNorm(x), resident or streamed."""

    def __init__(self, w, st, store, streamed: bool):
        self.w, self.st, self.store, self.streamed = w, st, store, streamed
        if streamed:
            rb = int(w.output[2])
            step = max(1, HEAD_CHUNK // rb)
            self.buf = np.zeros((step, rb), np.uint8)          # (step, row_bytes) one head chunk
            self.blob = _readonly_view(self.buf)
            self.idx = np.arange(step, dtype=np.int32)         # (step,) int32
            self.row_ids = np.zeros(step, np.int32)
            self.desc = w.output.copy()
            self.desc[0] = 0                                    # rows start at the buffer's byte 0

    def __call__(self, eps, ts):
        w, s = self.w, self.st
        if not self.streamed:
            fw.output_head(s.logits, s.x, s.xb, s.xq_embd, w.blob, w.output, w.output_norm, eps, w.ts)
            return
        nn.rmsnorm(s.xb, s.x, w.output_norm, eps)
        dispatch.quantize_x(s.xq_embd, s.xb)
        for r0, n in self._pieces(ts):
            dispatch.matvec(s.logits[r0:r0 + n], self.blob, self.desc, s.xb, s.xq_embd, w.ts)

    def _pieces(self, ts):
        """Read the head piece by piece into self.buf (self.desc describes the piece); yields (first row,
        rows) after each read."""
        w = self.w
        off, n_rows, rb = int(w.output[0]), int(w.output[1]), int(w.output[2])
        step = self.buf.shape[0]
        self.store.select(off, rb, n_rows)
        for r0 in range(0, n_rows, step):
            n = min(step, n_rows - r0)
            np.add(self.idx[:n], r0, out=self.row_ids[:n])
            add_read(ts, self.store.read_rows(self.row_ids[:n], self.buf, self.idx[:n]), head=True)
            self.desc[1] = n
            yield r0, n

    def rows(self, hidden, out, ts):
        """out (m, n_vocab) = W_out @ hidden rows (m, n_embd), already normed (prompt logits for
        perplexity): a streamed head is read once for the m rows."""
        w = self.w
        if not self.streamed:
            dispatch.matmat(out, w.blob, w.output, hidden, w.ts)
            return
        m = hidden.shape[0]
        if getattr(self, "tmp", None) is None or self.tmp.shape[0] < m:
            self.tmp = np.zeros((m, self.buf.shape[0]), np.float32)   # (m, step) one piece's logits
        tmp = self.tmp[:m]
        for r0, n in self._pieces(ts):
            dispatch.matmat(tmp, self.blob, self.desc, hidden, w.ts)
            out[:, r0:r0 + n] = tmp[:, :n]


class TokenEmbedding:
    """x = token_embd[token] * scale, from the file map (resident) or one row read per token."""

    def __init__(self, w, store, resident: bool):
        self.w, self.store, self.resident = w, store, resident
        if not resident:
            rb = int(w.embd[2])
            self.buf = np.zeros((1, rb), np.uint8)             # (1, row_bytes)
            self.blob = _readonly_view(self.buf)
            self.desc = w.embd.copy()
            self.desc[0], self.desc[1] = 0, 1
            self.row = np.zeros(1, np.int32)
            self.zero = np.zeros(1, np.int32)

    def __call__(self, x, token, ts):
        w = self.w
        if self.resident:
            fw.embed(x, w.blob, w.embd, int(token), w.fp[fw.FP_EMBD_SCALE], w.ts)
            return
        self.store.select(int(w.embd[0]), int(w.embd[2]), int(w.embd[1]))
        self.row[0] = token
        add_read(ts, self.store.read_rows(self.row, self.buf, self.zero))
        fw.embed(x, self.blob, self.desc, 0, w.fp[fw.FP_EMBD_SCALE], w.ts)
