"""Calibration: run the dense model over text and keep each layer's FFN inputs (after ffn_norm).

Memory is bounded: the prompt runs in batches of N_UBATCH tokens, and the inputs are kept as float16
(n_layer, n_tokens, n_embd): SmolLM2 at 4096 tokens is 141 MB. Thresholds, frequencies and predictor
training all derive from these samples (convert.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError


def default_calibration_text() -> tuple[str, str]:
    """The text of Python's own pydoc_data.topics (about 465 KB, ships with CPython)."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics"


def read_calibration_text(path) -> tuple[str, str]:
    if path is None:
        return default_calibration_text()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: cannot read calibration text ({e})") from None


@dataclass
class Calibration:
    X: np.ndarray          # (n_layer, n_tokens, n_embd) float16 FFN inputs
    tokens: np.ndarray     # (n_tokens,) int64 (chunks of `chunk`, each from a fresh context)
    n_train: int           # the first n_train tokens train; the rest are held out
    chunk: int
    H: np.ndarray | None = None   # (n_tokens, n_embd) float16 final hidden states (after output_norm)

    def train(self, il) -> np.ndarray:
        return self.X[il, :self.n_train].astype(np.float32)

    def held_out(self, il) -> np.ndarray:
        return self.X[il, self.n_train:].astype(np.float32)


def calibrate(model, tokenizer, text: str, n_tokens: int = 4096, chunk: int = 512,
              held_out: float = 0.25, progress=None) -> Calibration:
    """Collect FFN inputs for n_tokens of text (chunks of `chunk` tokens, BOS per chunk if the model
    adds it, as in perplexity). The last `held_out` fraction of chunks is kept for evaluation."""
    ids = tokenizer.encode(text, add_special=False, parse_special=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    per = chunk - len(bos)
    n_chunks = min(max(n_tokens // chunk, 2), len(ids) // per)
    if n_chunks < 2:
        raise InvalidArgumentError(f"calibration text too short: {len(ids)} tokens, need at least {2 * per}")
    cfg = model.cfg
    total = n_chunks * chunk
    X = np.zeros((cfg.n_layer, total, cfg.n_embd), np.float16)
    H = np.zeros((total, cfg.n_embd), np.float16)
    toks = np.zeros(total, np.int64)
    ub = model.st.n_ubatch
    buf = np.zeros((cfg.n_layer, ub, cfg.n_embd), np.float32)   # one batch of FFN inputs
    for c in range(n_chunks):
        inp = np.asarray(bos + ids[c * per:(c + 1) * per], np.int64)
        for s in range(0, chunk, ub):
            part = inp[s:s + ub]
            model._batch(part, s, ffn_in=buf)
            X[:, c * chunk + s:c * chunk + s + len(part)] = buf[:, :len(part)]
            H[c * chunk + s:c * chunk + s + len(part)] = model.st.H[:len(part)]
        toks[c * chunk:(c + 1) * chunk] = inp
        if progress:
            progress(c + 1, n_chunks)
    n_held = max(1, int(round(n_chunks * held_out)))
    return Calibration(X, toks, (n_chunks - n_held) * chunk, chunk, H)
