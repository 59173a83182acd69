"""The output head and the token embedding under a cap: resident (views into the file map, touched
every token) or read through the bundle store (O_DIRECT when cold) into small reused buffers.

A flash file with a head index stores the head's rows in the index's order (format.T_HI_ORDER, so that
the rows one state needs sit together on disk): logits are computed in that order and put in token order
(HeadOrder), and a tied embedding looks a token's row up through it.

A streamed head is read in HEAD_CHUNK pieces, each multiplied as it arrives, so it never holds more
than one chunk in RSS and its reads count in the token's I/O (a first version read it from the file
map and released the pages with madvise; the page cache then held the head for free). An embedding
that is not resident is read one row per token (an untied 89 MiB Qwen table is never counted whole).
"""

from __future__ import annotations

import numpy as np

from ..kernels import dispatch, forward as fw, headidx, nn
from .plan import HEAD_CHUNK
from .stats import add_read


def _readonly_view(buf: np.ndarray) -> np.ndarray:
    """A flat read-only view: the type the compiled kernels were loaded for (the file map's)."""
    v = buf.reshape(-1).view()
    v.flags.writeable = False
    return v


class HeadOrder:
    """The order a flash file stores the head's rows in (format.T_HI_ORDER): stored row j is token
    order[j]. Logits are computed in stored order into `logits` and gathered into token order."""

    def __init__(self, order: np.ndarray):
        V = order.shape[0]
        self.order = np.ascontiguousarray(order, np.int32)        # (n_vocab,) stored row -> token
        self.row = np.zeros(V, np.int32)                           # (n_vocab,) token -> stored row
        self.row[self.order] = np.arange(V, dtype=np.int32)
        self.logits = np.zeros(V, np.float32)                      # (n_vocab,) logits in stored order

    @staticmethod
    def ram(n_vocab: int) -> int:
        return 12 * n_vocab

    def to_tokens(self, logits):
        """logits (n_vocab,) = self.logits in token order."""
        headidx.gather(logits, self.logits, self.row)


class OutputHead:
    """logits = W_out @ RMSNorm(x), resident or streamed; computed in stored row order into self.logits
    (order: HeadOrder, or None when the rows are in token order) and then put in token order."""

    def __init__(self, w, st, store, streamed: bool, order: HeadOrder | None = None):
        self.w, self.st, self.store, self.streamed, self.order = w, st, store, streamed, order
        self.logits = st.logits if order is None else order.logits    # (n_vocab,) stored order
        rb = int(w.output[2])
        step = max(1, HEAD_CHUNK // rb)
        self.desc = w.output.copy()                             # the piece being multiplied
        self.step = step
        if streamed:
            self.buf = np.zeros((step, rb), np.uint8)          # (step, row_bytes) one head chunk
            self.blob = _readonly_view(self.buf)
            self.idx = np.arange(step, dtype=np.int32)         # (step,) int32
            self.row_ids = np.zeros(step, np.int32)
            self.desc[0] = 0                                    # rows start at the buffer's byte 0

    def __call__(self, eps, ts):
        w, s = self.w, self.st
        if not self.streamed:
            fw.output_head(self.logits, s.x, s.xb, s.xq_embd, w.blob, w.output, w.output_norm, eps, w.ts)
        else:
            nn.rmsnorm(s.xb, s.x, w.output_norm, eps)
            dispatch.quantize_x(s.xq_embd, s.xb)
            for r0, n in self._pieces(ts):
                dispatch.matvec(self.logits[r0:r0 + n], self.blob, self.desc, s.xb, s.xq_embd, w.ts)
        if self.order is not None:
            self.order.to_tokens(s.logits)

    def _pieces(self, ts):
        """Piece by piece, self.desc describes rows r0..r0 + n of the head: read into self.buf when
        streamed, else in the resident map; yields (r0, n)."""
        w = self.w
        off, n_rows, rb = int(w.output[0]), int(w.output[1]), int(w.output[2])
        step = self.step
        if self.streamed:
            self.store.select(off, rb, n_rows)
        for r0 in range(0, n_rows, step):
            n = min(step, n_rows - r0)
            if self.streamed:
                np.add(self.idx[:n], r0, out=self.row_ids[:n])
                add_read(ts, self.store.read_rows(self.row_ids[:n], self.buf, self.idx[:n]), head=True)
            else:
                self.desc[0] = off + r0 * rb
            self.desc[1] = n
            yield r0, n

    def rows(self, hidden, out, ts):
        """out (m, n_vocab) = W_out @ hidden rows (m, n_embd), already normed (prompt logits for
        perplexity), in token order: a streamed head is read once for the m rows."""
        w = self.w
        if not self.streamed and self.order is None:
            dispatch.matmat(out, w.blob, w.output, hidden, w.ts)
            return
        m = hidden.shape[0]
        if getattr(self, "tmp", None) is None or self.tmp.shape[0] < m:
            self.tmp = np.zeros((m, self.step), np.float32)   # (m, step) one piece's logits
        tmp = self.tmp[:m]
        blob = self.blob if self.streamed else w.blob
        for r0, n in self._pieces(ts):
            dispatch.matmat(tmp, blob, self.desc, hidden, w.ts)
            if self.order is None:
                out[:, r0:r0 + n] = tmp[:, :n]
            else:
                out[:, self.order.order[r0:r0 + n]] = tmp[:, :n]


class TokenEmbedding:
    """x = token_embd[token] * scale, from the file map (resident) or one row read per token."""

    def __init__(self, w, store, resident: bool, order: HeadOrder | None = None):
        """order: the stored row order of a table tied to the head (None: rows in token order)."""
        self.w, self.store, self.resident = w, store, resident
        self.row_of = order.row if order is not None else None
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
        if self.row_of is not None:
            token = self.row_of[token]
        if self.resident:
            fw.embed(x, w.blob, w.embd, int(token), w.fp[fw.FP_EMBD_SCALE], w.ts)
            return
        self.store.select(int(w.embd[0]), int(w.embd[2]), int(w.embd[1]))
        self.row[0] = token
        add_read(ts, self.store.read_rows(self.row, self.buf, self.zero))
        fw.embed(x, self.blob, self.desc, 0, w.fp[fw.FP_EMBD_SCALE], w.ts)
