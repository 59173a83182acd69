"""The output head's index, built at conversion (docs/flash-gguf.md "Head index"; issue 12).

A calibrated preview of the logits, so that decoding reads only the head rows that can win:
  preview_i(h) = scale_i * (preview_i . y),   y = basis @ h                  (r numbers per row, int8)
  read row i   iff  preview_i(h) > bar - margin * (best - mean_j preview_j(h))
where best is the best exact logit of the rows of the ROUND1_ROWS best previews (read first) and bar is
what the sampler needs (greedy: best). The preview is the rank-r approximation of the head that is best
on the hidden states the head really sees (SVD of W Sigma^1/2, Sigma the states' second moment:
"data-aware" low rank). The margin is a share of how far the best logit stands above the bulk of the
vocabulary; it is the smallest (on a grid) with which every held-out state (text and the model's own
greedy continuations) reads its true top row (greedy decoding's margin) or also every row within
DELTA_DIST logits of it (margin_dist, for samplers, which use more than the top row). Calibrated, not
proven: certified bounds (Cauchy-Schwarz on the residual, cluster radii) read ~97% of the rows in 640
dimensions (measured when the issue was filed), and a per-row bound (residual std per row x the state's
residual length x a safety factor) read 56-58% of them on decoding states, because one hard held-out
state sets the factor for every state and every row.

Measured on Gemma 3 (rank 64; greedy margin 0.75, samplers' 0.81), `tools/bench_head.py` at 0.72x the
dense engine's peak RSS, 8 prompts x 64 steps, each indexed step against the whole head on the same state:
the same top-1 in 511 of 512 steps, 5.5% of the rows read (p90 9.2%), 14.7% of the head's bytes (rows in
row_order's order, 16 KiB gaps read through; 46% in token order with 32 KiB gaps), mean KL 0.060 (under
llama.cpp's default sampler, which reads with margin_dist, 0.0009). Rerun on session 15's conversion: 512
of 512, 14.5% of the bytes, mean KL 0.0015: under greedy decoding the mean is made by the rare step whose
top row differs (on SmolLM2 one such step, KL 20.4 nats, is 62% of the 512 steps' sum). The per-row bound
read 58% of the rows. With fewer decoding states to calibrate on (6
seeds x 40 tokens a side) the greedy margin came out 0.70. The index is capped at INDEX_SHARE of the
head's bytes, so its rank follows from the head's shape.

The head's rows are then stored in row_order's order (clustered by preview direction, most read first),
so that the rows one state reads sit together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, quants

from ..kernels import dispatch
from .predictor import GateRows, gate_basis

INDEX_SHARE = 0.10     # the index is at most this share of the head's bytes (issue 12)
ROUND1_ROWS = 8        # decoding reads the rows of the 8 best previews first: their best exact logit
                       # is the bar every other row's preview is measured against (flash/head_index.py)
DELTA_DIST = 2.0       # margin_dist: every row within this many logits of the top is read (probability
                       # >= e^-2 = 14% of the top's), not only the top row, so a sampler's distribution stays close
M_STEP = 1.0 / 64      # the margin's grid
M_MAX = 2.0            # a margin this large reads (nearly) the whole head: the index is not worth keeping
ROW_CHUNK_BYTES = 20 << 20  # head rows dequantized at a time: 20 MiB of f32 (Gemma 3: 8192 rows)
N_CLUSTERS_MAX = 1024  # row_order's clusters (Gemma 3: 512; 256..4096 read within 1 point of each other)
KMEANS_ITERS = 10
KMEANS_ROWS = 4096     # preview rows at a time in the k-means (Gemma 3: 16 MiB of scores)
MAX_ORDER_STATES = 1024  # training states the rows' read frequencies are counted on
HEAD_GAP_BYTES = 16 << 10  # head rows closer than this are read through. Gemma 3 at 0.72x the dense peak,
                           # `tools/bench_flash.py --modes flash --head index`, ms per token:
                           # rows in token order (two runs each): 8 KiB 158/155, 16 KiB 130/124, 32 KiB 98/92,
                           # 64 KiB 96/113 (each read costs more than the disk alone: Python, the pool);
                           # rows in the index's order (alternating runs): 16 KiB 64.9/69.3 ms, 14.9% of the
                           # head's bytes, 566 reads; 32 KiB 71.1/67.3 ms, 16.5%, 437 reads


@dataclass
class HeadIndex:
    basis: np.ndarray      # (r, n_embd) f32: y = basis @ h
    preview: np.ndarray    # (n_vocab, r) int8
    scale: np.ndarray      # (n_vocab,) f16: row scale of the preview
    margin: float          # share of (best - mean preview) below the bar that is read: greedy (calibrated)
    margin_dist: float     # the same for samplers: the rows within DELTA_DIST of the top read too
    n_heldout: int         # held-out states the margin was calibrated on
    read_frac: float       # mean share of the head's rows read at the margin on the held-out decoding states
    bytes_frac: float = 1.0  # mean share of the head's bytes read, rows within HEAD_GAP_BYTES read through
    order: np.ndarray | None = None  # (n_vocab,) int32: stored row j is token order[j] (row_order); the
                                     # preview and scale above are in stored order

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @property
    def n_bytes(self) -> int:
        return index_bytes(self.preview.shape[0], self.basis.shape[1], self.rank)


def index_bytes(n_vocab: int, n_embd: int, rank: int) -> int:
    """RAM of an index as the runtime holds it: preview + scale (f16) + basis (f32)."""
    return n_vocab * rank + 2 * n_vocab + 4 * rank * n_embd


def index_rank(n_vocab: int, n_embd: int, head_bytes: int) -> int:
    """The largest rank (a multiple of 8) whose index fits INDEX_SHARE of the head; 0: none fits."""
    r = 8 * ((int(INDEX_SHARE * head_bytes) - index_bytes(n_vocab, n_embd, 0)) // (8 * (n_vocab + 4 * n_embd)))
    return int(max(0, min(r, n_embd // 2)))


def head_rows(raw, qtype, r0: int = 0, r1: int = 1) -> np.ndarray:
    """(r1 - r0, n_embd) f32 of head rows r0..r1, as the head index's passes decode them (the converter's
    kernel warm-up calls this on one row)."""
    return _Head(raw, qtype).rows(r0, r1)


class _Head:
    """The head as stored, raw (n_vocab, row_bytes) uint8 of ggml type qtype, read as float32 rows.
    release(), when given, drops the pages read so far from this process's RSS (GGUFFile.release on a
    mapped head) after every block of rows and every 32 states' rows: the passes over the head (its basis,
    the exact logits of the held-out states, the rows each state reads) then hold a block of its pages,
    not the whole head's (Gemma 3's: 171 MiB, the head index phase's largest term)."""

    def __init__(self, raw, qtype, release=None):
        self.raw, self.qtype, self.release = raw, GGMLQuantizationType(qtype), release or (lambda: None)
        self.shape = raw.shape
        self.n_embd = quants.quant_shape_from_byte_shape(raw.shape, self.qtype)[-1]
        self.tset = dispatch.type_set([self.qtype])        # its rows' kernels (dispatch.dequant_rows)

    def rows(self, r0, r1) -> np.ndarray:
        """(r1 - r0, n_embd) f32 of head rows r0..r1 (kernels/dispatch.dequant_rows)."""
        out = np.empty((max(0, min(r1, self.shape[0]) - r0), self.n_embd), np.float32)
        dispatch.dequant_rows(out, self.raw[r0:r1], int(self.qtype), self.tset)
        self.release()
        return out

    def at(self, ids) -> np.ndarray:
        """(len(ids), n_embd) f32 of head rows ids, in increasing order (pages kept: the caller releases)."""
        return quants.dequantize(self.raw[np.sort(ids)], self.qtype).astype(np.float32, copy=False)


def chunk_rows(n_embd: int) -> int:
    """Head rows dequantized at a time: ROW_CHUNK_BYTES of float32."""
    return max(256, ROW_CHUNK_BYTES // (4 * n_embd))


def _preview(head, train, r):
    """(basis (r, n_embd) f32, preview (n_vocab, r) int8, scale (n_vocab,) f16): the rank-r head that is
    best on the training states (train (n, n_embd) f32) in the mean squared sense, the predictor's
    data-weighted basis (predictor.gate_basis: P = Sigma^-1/2 U_r, Q = U_r^T Sigma^1/2 W^T, so that
    h @ P @ Q approximates the logits h @ W^T); Q's rows scaled to one RMS each (colscale, folded into
    the basis), then each head row to int8 with its own scale."""
    V, d = head.shape[0], train.shape[1]
    P, Q = gate_basis(train, GateRows((V, d), head.rows), r)                 # (d, r), (r, V)
    step = chunk_rows(d)
    ss = np.zeros(len(Q))
    for i0 in range(0, V, step):
        ss += np.square(Q[:, i0:i0 + step], dtype=np.float64).sum(1)
    colscale = (np.sqrt(ss / V) + 1e-12).astype(np.float32)                 # (r,)
    Q /= colscale[:, None]                                                 # rows of one scale: int8 rows
    basis = np.ascontiguousarray(P.T) * colscale[:, None]                  # (r, d): y = basis @ h
    preview = np.empty((V, len(Q)), np.int8)
    scale = np.empty(V, np.float16)
    for i0 in range(0, V, step):
        A = Q[:, i0:i0 + step].T                                           # (rows, r) f32
        s = (np.abs(A).max(1) / 127 + 1e-12).astype(np.float16)
        scale[i0:i0 + step] = s
        preview[i0:i0 + step] = np.clip(np.round(A / s.astype(np.float32)[:, None]), -127, 127)
    return basis, preview, scale


def build_head_index(raw, qtype, train, held, rank, n_decode: int = 0, release=None) -> HeadIndex:
    """raw (n_vocab, row_bytes) uint8: the head as stored; train (n, n_embd), held (m, n_embd) f32:
    normed final hidden states; the last n_decode of held are states of greedy decoding (0: take all
    of held for them), on which the rows and bytes read are measured (decoding is what the index serves, and
    its states are harder than teacher-forced text's). Works through the head chunk_rows(n_embd) rows at a time;
    release() (optional) drops the head's pages read so far from RSS (_Head)."""
    head = _Head(raw, qtype, release)
    V = raw.shape[0]
    basis, preview, scale = _preview(head, train, int(rank))
    sc = scale.astype(np.float32)
    # ---- the margins: every held-out state reads its top row (and the rows within DELTA_DIST of it) ----
    need, need_dist, frac = _margin_needed(head, held, basis, preview, sc)
    k = _steps_above(need)
    margin, margin_dist = k * M_STEP, _steps_above(need_dist) * M_STEP
    n_dec = n_decode if 0 < n_decode <= len(held) else len(held)
    dec = held[len(held) - n_dec:]
    read = float(frac[len(held) - n_dec:, k].mean()) if k < frac.shape[1] else 1.0
    # ---- the stored row order: learnt on the training states, judged on held-out decoding states ----
    ltr = train[np.linspace(0, len(train) - 1, min(MAX_ORDER_STATES, len(train))).astype(int)]
    freq = np.zeros(V)
    for rows in _read_sets(head, ltr, basis, preview, sc, margin):
        freq[rows] += 1
    order = row_order(preview, sc, freq)
    preview, scale, sc = preview[order], scale[order], sc[order]
    sub = dec[np.linspace(0, len(dec) - 1, min(128, len(dec))).astype(int)]
    nbytes = _bytes_read(head, sub, basis, preview, sc, margin, order) if margin < M_MAX else 1.0
    return HeadIndex(basis, preview, scale, margin, margin_dist, len(held), read, nbytes, order)


def _steps_above(need) -> int:
    """The margin grid's first point (in M_STEPs) above every state's need: rows read are those whose
    margin of room is strictly below the margin."""
    return int(np.floor(max(float(need.max()), 0.0) / M_STEP)) + 1


PREVIEW_ROWS = 16384   # preview_of converts the int8 preview to float32 this many rows at a time


def preview_of(states, basis, preview, scale) -> np.ndarray:
    """(m, n_vocab) preview logits of states (m, n_embd), the preview made float32 PREVIEW_ROWS rows at a
    time (the whole of Gemma 3's was a 64 MiB temporary per batch of states)."""
    y = states @ basis.T                                                    # (m, r)
    out = np.empty((len(states), preview.shape[0]), np.float32)
    for i0 in range(0, preview.shape[0], PREVIEW_ROWS):
        i1 = i0 + PREVIEW_ROWS
        np.matmul(y, preview[i0:i1].T.astype(np.float32), out=out[:, i0:i1])
        out[:, i0:i1] *= scale[i0:i1]
    return out


def _round1(P) -> np.ndarray:
    """(m, ROUND1_ROWS) int64: the rows of each state's ROUND1_ROWS best previews (P (m, n_vocab)), a state
    at a time: over the whole batch, argpartition's int64 ids of every row (and -P) were 96 MiB on Gemma 3,
    the head index phase's peak."""
    out = np.empty((len(P), ROUND1_ROWS), np.int64)
    for i in range(len(P)):
        out[i] = np.argpartition(-P[i], ROUND1_ROWS)[:ROUND1_ROWS]
    return out


def read_set(P, best, margin, first) -> np.ndarray:
    """Rows (increasing) one state reads under the greedy bar: its round-1 rows and every row whose preview
    is within margin x (best - mean preview) of best (flash/head_index.py's rule)."""
    thr = best - margin * max(best - float(P.mean()), 0.0)
    mask = P > thr     # a mask, not np.union1d: its sort of every passing row took 37 ms a state for 200k rows
    mask[first] = True
    return np.flatnonzero(mask)


def _read_sets(head, states, basis, preview, scale, margin, order=None):
    """Per state, the rows (increasing, in the order of preview's rows) decoding reads at the margin:
    the runtime's two rounds. head is in token order; order (or None: the same) maps preview's rows to it."""
    for b0 in range(0, len(states), 32):
        h = states[b0:b0 + 32]
        P = preview_of(h, basis, preview, scale)
        first = _round1(P)
        for i in range(len(h)):
            tok = first[i] if order is None else order[first[i]]
            best = float((head.at(tok) @ h[i]).max())
            yield read_set(P[i], best, margin, first[i])
        head.release()


def row_order(preview, scale, freq, seed: int = 0) -> np.ndarray:
    """(n_vocab,) int32: the order the head's rows are stored in, so that the rows one state reads sit
    together. Rows are clustered by the direction of their preview (spherical k-means, n_vocab // 512
    clusters, at most N_CLUSTERS_MAX); clusters are stored by the mean read frequency of their rows on the
    training states (freq (n_vocab,)), most read first, and a cluster's rows the same way. Gemma 3,
    simulated on 512 decoding states of other prompts, share of the head's bytes read at 32 KiB gaps:
    token order 42%, by frequency alone 29%, clustered 16% (16 KiB gaps: 28%, 22%, 13%)."""
    V, r = preview.shape
    C = int(min(N_CLUSTERS_MAX, max(1, V // 512)))
    rng = np.random.default_rng(seed)
    pick = lambda n: _unit_rows(preview, scale, np.sort(rng.choice(V, n, replace=False)))  # noqa: E731
    cent = pick(C)
    a = np.zeros(V, np.int64)
    for _ in range(KMEANS_ITERS):
        sums = np.zeros((C, r))
        for i0 in range(0, V, KMEANS_ROWS):
            ids = np.arange(i0, min(V, i0 + KMEANS_ROWS))
            X = _unit_rows(preview, scale, ids)
            a[ids] = (X @ cent.T).argmax(1)
            for k in range(r):
                sums[:, k] += np.bincount(a[ids], weights=X[:, k], minlength=C)
        norm = np.linalg.norm(sums, axis=1)
        cent = (sums / np.maximum(norm, 1e-30)[:, None]).astype(np.float32)
        empty = np.nonzero(norm == 0)[0]
        if len(empty):          # an emptied cluster restarts at a random row
            cent[empty] = pick(len(empty))
    cnt = np.bincount(a, minlength=C)
    hot = np.bincount(a, weights=freq, minlength=C) / np.maximum(cnt, 1)
    rank = np.empty(C, np.int64)
    rank[np.argsort(-hot, kind="stable")] = np.arange(C)
    return np.lexsort((-freq, rank[a])).astype(np.int32)    # stable: ties keep token order


def _unit_rows(preview, scale, ids) -> np.ndarray:
    """(len(ids), r) f32: preview rows ids as unit vectors (scale: f32)."""
    X = preview[ids].astype(np.float32) * scale[ids, None]
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)


def _bytes_read(head, states, basis, preview, scale, margin, order) -> float:
    """Mean share of the head's bytes the store reads per state at the margin: the runtime's two rounds,
    rows closer than HEAD_GAP_BYTES read through (what the RAM plan prices the index by). preview is in
    stored order (order: stored row -> token)."""
    V, rb = head.shape
    gap = max(1, HEAD_GAP_BYTES // rb)
    out = []
    for rows in _read_sets(head, states, basis, preview, scale, margin, order):
        breaks = np.nonzero(np.diff(rows) > gap)[0]
        starts, ends = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]] + 1
        out.append(float((ends - starts).sum()) / V)
    return float(np.mean(out)) if out else 1.0


def _margin_needed(head, held, basis, preview, scale):
    """Per held-out state: the least margin at which its top row is read, and the least at which every row
    within DELTA_DIST logits of it is read too (0 when round 1 reads them); and (m, M_MAX / M_STEP) the
    share of rows read at each margin of the grid."""
    V = head.shape[0]
    step = chunk_rows(held.shape[1])
    grid = np.arange(0.0, M_MAX, M_STEP)
    out, out_dist, fracs = [], [], []
    for b0 in range(0, len(held), 32):
        h = held[b0:b0 + 32]
        L = np.zeros((len(h), V), np.float32)                              # exact logits
        for r0 in range(0, V, step):
            L[:, r0:r0 + step] = h @ head.rows(r0, min(V, r0 + step)).T
        P = preview_of(h, basis, preview, scale)
        first = _round1(P)
        best = np.take_along_axis(L, first, 1).max(1)                      # the bar after round 1
        for i in range(len(h)):
            u = max(float(best[i] - P[i].mean()), 1e-6)
            room = (best[i] - P[i]) / u                                    # margin above which row j is read
            room[first[i]] = 0.0
            out.append(max(0.0, float(room[int(np.argmax(L[i]))])))
            out_dist.append(max(0.0, float(room[L[i] >= L[i].max() - DELTA_DIST].max())))
            room.sort()
            fracs.append(np.searchsorted(room, grid) / V)
    return np.array(out), np.array(out_dist), np.array(fracs).reshape(-1, len(grid))


# ---- the states the index is calibrated on ----
GENERIC_SEEDS = ("Hello! How can I help you today?", "Here is a short story about a lighthouse keeper.",
                 "The main causes of the French Revolution were", "import numpy as np\n\ndef",
                 "Q: What is the boiling point of water?\nA:", "Dear team,\n\nI am writing to",
                 "Give me three tips for sleeping better.", "How do vaccines train the immune system?",
                 "Describe a busy market in the morning.", "class Stack:\n    def __init__(self):",
                 "What are the pros and cons of electric cars?", "Write a limerick about a cat.",
                 "Steps to change a flat tire:", "The Pythagorean theorem states that",
                 "Can you recommend a good book for a long flight?", "Bonjour, comment")
N_NEW = 48             # greedy tokens generated from each seed (16 generic seeds and up to 16 starts of
                       # held-out text, alternately to each side). With the first 6 seeds and 40 tokens
                       # (160 states a side) Gemma 3's greedy margin came out 0.70, and offline it missed 4
                       # of 512 top-1s of tools/bench_head.py's prompts where 0.78 missed none


def seed_ids(tokenizer, seed, n_ctx: int, n_new: int = N_NEW) -> list:
    """The token ids a seed (text, or ids) starts its continuation from, within the context."""
    ids = seed if isinstance(seed, (list, np.ndarray)) else tokenizer.encode(seed)
    return [int(t) for t in list(ids)[:n_ctx - n_new - 1]]


def calibration_states(layer_pass, tokenizer, cal, max_text: int = 1024):
    """(train, held, n_decode): f32 states of teacher-forced calibration text (its train / held-out
    split, at most max_text each) and greedy continuations of seeds (half generic, half from the
    held-out text), alternate seeds to each side; held ends with its n_decode continuation states.
    The continuations run layer-major (layer_pass: layerwise.LayerPass), all seeds in lockstep."""
    text_tr = cal.H[:cal.n_train].astype(np.float32)
    text_ho = cal.H[cal.n_train:].astype(np.float32)
    pick = lambda a: a[np.linspace(0, len(a) - 1, min(max_text, len(a))).astype(int)]  # noqa: E731
    starts = range(cal.n_train, len(cal.tokens), cal.chunk)
    seeds = list(GENERIC_SEEDS) + [cal.tokens[s:s + 24] for s in list(starts)[:len(GENERIC_SEEDS)]]
    prompts = [seed_ids(tokenizer, s, layer_pass.model.n_ctx) for s in seeds]
    keep = [i for i, p in enumerate(prompts) if p]          # a vocabulary that cannot spell a seed
    states = layer_pass.greedy_states([prompts[i] for i in keep], N_NEW)
    gen = [np.zeros((0, cal.H.shape[1]), np.float32) for _ in seeds]
    for i, st in zip(keep, states):
        gen[i] = st
    train = np.concatenate([pick(text_tr)] + gen[0::2])
    held_decode = np.concatenate(gen[1::2])
    return train, np.concatenate([pick(text_ho), held_decode]), len(held_decode)
