"""The output head's index, built at conversion (docs/flash-gguf.md "Head index"; issue 12).

A calibrated preview of the logits, so that decoding reads only the head rows that can win:
  preview_i(h) = scale_i * (preview_i . y),   y = basis @ h                  (r numbers per row, int8)
  bound_i(h)   = preview_i(h) + z * sigma_i * s(h)
  s(h)         = sqrt(max(|whiten @ h|^2 - |y / colscale|^2, 0) / (n_embd - r))
The preview is the rank-r approximation of the head that is best on the hidden states the head really
sees (SVD of W Sigma^1/2, Sigma the states' second moment: "data-aware" low rank); s(h) is the length
of h outside the preview's subspace in whitened coordinates (so E[s^2] = 1 on the calibration states);
sigma_i is row i's residual logit error per unit of s, measured on training states; z is the smallest
safety factor with no top-1 miss on held-out states (text and the model's own greedy continuations).
The bound is calibrated, not proven: certified bounds (Cauchy-Schwarz on the residual, cluster radii)
read ~97% of the rows in 640 dimensions (measured when the issue was filed).

Measured (tools in the closing note of issue 12; Gemma 3, 256 greedy states not used for calibration):
rank 112 int8 (19% of the head's bytes) read 8% of the rows at z = 4 with no miss; int4 at the same
rank 19% (int4 loses the preview's small components); rank 64 int8 18%. The index is capped at
INDEX_SHARE of the head's bytes, so its rank follows from the head's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, quants

INDEX_SHARE = 0.10     # the index is at most this share of the head's bytes (issue 12)
ROUND1_ROWS = 8        # decoding reads the rows of the 8 best previews first: their best exact logit
                       # is the bar every other row's bound must clear (flash/head_index.py)
Z_STEP = 0.125
Z_MAX = 16.0         # a z this large reads (nearly) the whole head: the index is not worth keeping
ROW_CHUNK = 8192       # head rows dequantized at a time (Gemma 3: 20 MiB of f32)
GAP_BYTES = 64 << 10   # the store reads through gaps smaller than this (flash/store.py's default)


@dataclass
class HeadIndex:
    basis: np.ndarray      # (r, n_embd) f32: y = basis @ h
    preview: np.ndarray    # (n_vocab, r) int8
    scale: np.ndarray      # (n_vocab,) f16: row scale of the preview
    sigma: np.ndarray      # (n_vocab,) f16: residual logit std per unit of s(h)
    whiten: np.ndarray     # (n_embd, n_embd) f16: Sigma^-1/2 of the calibration states
    colscale: np.ndarray   # (r,) f32: y's column scales (|y / colscale| is in whitened units)
    z: float               # safety factor (no miss on the held-out states)
    n_heldout: int         # held-out states z was calibrated on
    read_frac: float       # mean share of the head's rows read at z on the held-out decoding states
    bytes_frac: float = 1.0  # mean share of the head's bytes read, rows within GAP_BYTES read through

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @property
    def n_bytes(self) -> int:
        return index_bytes(self.preview.shape[0], self.basis.shape[1], self.rank)


def index_bytes(n_vocab: int, n_embd: int, rank: int) -> int:
    """RAM of an index as the runtime holds it: preview + scale + sigma (f16) + whiten (f16) + basis."""
    return n_vocab * rank + 4 * n_vocab + 2 * n_embd * n_embd + 4 * rank * n_embd + 4 * rank


def index_rank(n_vocab: int, n_embd: int, head_bytes: int) -> int:
    """The largest rank (a multiple of 8) whose index fits INDEX_SHARE of the head; 0: none fits."""
    r = 8 * ((int(INDEX_SHARE * head_bytes) - index_bytes(n_vocab, n_embd, 0)) // (8 * (n_vocab + 4 * n_embd)))
    return int(max(0, min(r, n_embd // 2)))


def _rows(raw, qtype, r0, r1) -> np.ndarray:
    """(r1 - r0, n_embd) f32 of head rows r0..r1."""
    return quants.dequantize(raw[r0:r1], GGMLQuantizationType(qtype)).astype(np.float32, copy=False)


def build_head_index(raw, qtype, train, held, rank, n_decode: int = 0) -> HeadIndex:
    """raw (n_vocab, row_bytes) uint8: the head as stored; train (n, n_embd), held (m, n_embd) f32:
    normed final hidden states; the last n_decode of held are states of greedy decoding (0: take all
    of held for them), on which the rows and bytes read are measured (decoding is what the index serves, and
    its states are harder than teacher-forced text's: 3-8x more rows read at the same z, measured).
    Works through the head ROW_CHUNK rows at a time."""
    V = raw.shape[0]
    d = train.shape[1]
    r = int(rank)
    # ---- whitening: Sigma = E[h h^T] of the training states ----
    S = train.astype(np.float64).T @ train / len(train)                   # (d, d)
    ev, U = np.linalg.eigh(S)
    ev = np.maximum(ev, ev.max() * 1e-6)
    Sh = (U * np.sqrt(ev)) @ U.T                                           # Sigma^1/2
    Shi = (U / np.sqrt(ev)) @ U.T                                          # Sigma^-1/2
    # ---- the best rank-r head on these states: top right singular vectors of W Sigma^1/2 ----
    G = np.zeros((d, d))
    for r0 in range(0, V, ROW_CHUNK):
        M = _rows(raw, qtype, r0, min(V, r0 + ROW_CHUNK)) @ Sh.astype(np.float32)
        G += M.T.astype(np.float64) @ M
    _, U2 = np.linalg.eigh(G)
    Vr = U2[:, ::-1][:, :r].T                                              # (r, d) orthonormal
    to_y = (Sh @ Vr.T).astype(np.float32)                                  # (d, r): A = W @ to_y
    A = np.zeros((V, r), np.float32)
    for r0 in range(0, V, ROW_CHUNK):
        A[r0:r0 + ROW_CHUNK] = _rows(raw, qtype, r0, min(V, r0 + ROW_CHUNK)) @ to_y
    colscale = (np.sqrt((A.astype(np.float64) ** 2).mean(0)) + 1e-12).astype(np.float32)
    A /= colscale
    basis = (Vr @ Shi).astype(np.float32) * colscale[:, None]              # (r, d): y = basis @ h
    scale = (np.abs(A).max(1) / 127 + 1e-12).astype(np.float16)
    preview = np.clip(np.round(A / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    del A
    Aq_scale = scale.astype(np.float32)
    whiten = Shi.astype(np.float16)
    wf = whiten.astype(np.float32)

    def s_of(h):   # (n,) residual length of each state
        y = (h @ basis.T) / colscale
        return np.sqrt(np.maximum((((h @ wf.T) ** 2).sum(1) - (y ** 2).sum(1)) / (d - r), 0)) + 1e-6

    # ---- sigma: residual logit error per unit of s, over the training states ----
    Yt, st = train @ basis.T, s_of(train)
    ss = np.zeros(V)
    for r0 in range(0, V, ROW_CHUNK):
        r1 = min(V, r0 + ROW_CHUNK)
        E = (train @ _rows(raw, qtype, r0, r1).T - (Yt @ preview[r0:r1].T.astype(np.float32)) * Aq_scale[r0:r1])
        E /= st[:, None]
        ss[r0:r1] = np.square(E, out=E).mean(0, dtype=np.float64)
    sigma = np.sqrt(ss).astype(np.float16)
    # ---- z: no top-1 miss on the held-out states under the runtime's rule ----
    z_need, frac = _z_needed(raw, qtype, held, basis, preview, Aq_scale, sigma.astype(np.float32), s_of(held))
    k = int(np.ceil(max(z_need.max(), 0.0) / Z_STEP))
    z = k * Z_STEP
    n_dec = n_decode if 0 < n_decode <= len(held) else len(held)
    dec = held[len(held) - n_dec:]
    read = float(frac[len(held) - n_dec:, k].mean()) if k < frac.shape[1] else 1.0
    sub = dec[np.linspace(0, len(dec) - 1, min(128, len(dec))).astype(int)]
    nbytes = _bytes_read(raw, qtype, sub, basis, preview, Aq_scale, sigma.astype(np.float32), s_of(sub), z)
    return HeadIndex(basis, preview, scale, sigma, whiten, colscale, z, len(held), read, nbytes)


def _bytes_read(raw, qtype, states, basis, preview, scale, sigma, s, z) -> float:
    """Mean share of the head's bytes the store reads per state at z: the runtime's two rounds, rows
    closer than GAP_BYTES read through (what the RAM plan prices the index by)."""
    V, rb = raw.shape
    gap = max(1, GAP_BYTES // rb)
    out = []
    pt = preview.T.astype(np.float32)                                      # (r, n_vocab)
    for i, h in enumerate(states):
        P = (basis @ h) @ pt * scale
        first = np.argpartition(-P, ROUND1_ROWS)[:ROUND1_ROWS]
        best = float((_rows_at(raw, qtype, first) @ h).max())
        rows = np.union1d(np.nonzero(P + z * sigma * s[i] > best)[0], first)
        breaks = np.nonzero(np.diff(rows) > gap)[0]
        starts, ends = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]] + 1
        out.append(float((ends - starts).sum()) / V)
    return float(np.mean(out)) if out else 1.0


def _rows_at(raw, qtype, ids) -> np.ndarray:
    return quants.dequantize(raw[np.sort(ids)], GGMLQuantizationType(qtype)).astype(np.float32, copy=False)


def _z_needed(raw, qtype, held, basis, preview, scale, sigma, s):
    """Per held-out state: the least z at which its true top row is read (0 when round 1 reads it), and
    (m, Z_MAX / Z_STEP) the share of rows read at each z of the grid."""
    V = raw.shape[0]
    grid = np.arange(0.0, Z_MAX, Z_STEP)
    out, fracs = [], []
    pt = preview.T.astype(np.float32)                                      # (r, n_vocab)
    for b0 in range(0, len(held), 32):
        h = held[b0:b0 + 32]
        L = np.zeros((len(h), V), np.float32)                              # exact logits
        for r0 in range(0, V, ROW_CHUNK):
            L[:, r0:r0 + ROW_CHUNK] = h @ _rows(raw, qtype, r0, min(V, r0 + ROW_CHUNK)).T
        P = (h @ basis.T) @ pt * scale                                     # previews
        first = np.argpartition(-P, ROUND1_ROWS, axis=1)[:, :ROUND1_ROWS]
        best = np.take_along_axis(L, first, 1).max(1)                      # the bar after round 1
        top = L.argmax(1)
        for i in range(len(h)):
            t = top[i]
            if L[i, t] <= best[i]:
                out.append(0.0)
            else:
                out.append(float((best[i] - P[i, t]) / (sigma[t] * s[b0 + i])))
            room = (best[i] - P[i]) / (sigma * s[b0 + i])                  # z above which row j is read
            room.sort()
            fracs.append(np.searchsorted(room, grid) / V)
    return np.array(out), np.array(fracs).reshape(-1, len(grid))


# ---- the states the index is calibrated on ----
GENERIC_SEEDS = ("Hello! How can I help you today?", "Here is a short story about a lighthouse keeper.",
                 "The main causes of the French Revolution were", "import numpy as np\n\ndef",
                 "Q: What is the boiling point of water?\nA:", "Dear team,\n\nI am writing to")
N_NEW = 40             # greedy tokens generated from each seed


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
