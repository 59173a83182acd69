"""Calibration: run the dense model over text, layer-major (layerwise.py), and keep each layer's FFN
inputs (after ffn_norm).

Memory does not grow with the model: the weights are read a layer at a time, and the FFN inputs of all
layers, float16 (n_layer, n_tokens, n_embd) (SmolLM2 at 4096 tokens: 141 MB, a 7B model: 1 GiB), go to
an anonymous temporary file, read back a layer at a time (`Calibration.train`, `.held_out`).
Thresholds, frequencies and predictor training all derive from these samples (convert.py); a caller's
`on_layer(il, X)` sees each layer's inputs while the layer's weights are still resident.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .layerwise import LayerPass, Sequence
from .spill import pwrite_exact


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


class LayerFile:
    """(n_layer, n_tokens, n_embd) float16 in an anonymous temporary file (gone when closed or when the
    process dies): a layer is written once and read back as float32 rows."""

    def __init__(self, n_layer, n_tokens, n_embd, dir=None, owner=None):
        self.shape = (n_layer, n_tokens, n_embd)
        self._fh = tempfile.TemporaryFile(dir=dir)
        self._owner = owner      # the output it serves: a write error names it (atomic.write_error)

    def write(self, il, X) -> None:
        data = np.ascontiguousarray(X, np.float16)
        pwrite_exact(self._fh, data, il * data.nbytes, self._owner, "calibration spill file")

    def read(self, il, r0, r1, dtype=np.float32) -> np.ndarray:
        """(r1 - r0, n_embd) rows r0..r1 of layer il, float32 (or float16 as stored)."""
        _, T, E = self.shape
        out = np.empty((r1 - r0, E), np.float16)
        n = os.preadv(self._fh.fileno(), [memoryview(out).cast("B")], (il * T + r0) * E * 2)
        if n != out.nbytes:
            raise OSError(f"calibration spill file: short read ({n} of {out.nbytes} bytes)")
        return out.astype(dtype, copy=False)

    def close(self):
        self._fh.close()


@dataclass
class Calibration:
    X: LayerFile           # (n_layer, n_tokens, n_embd) float16 FFN inputs
    tokens: np.ndarray     # (n_tokens,) int64 (chunks of `chunk`, each from a fresh context)
    n_train: int           # the first n_train tokens train; the rest are held out
    chunk: int
    H: np.ndarray | None = None   # (n_tokens, n_embd) float16 final hidden states (after output_norm)

    def train(self, il, dtype=np.float32) -> np.ndarray:
        return self.X.read(il, 0, self.n_train, dtype)

    def held_out(self, il) -> np.ndarray:
        return self.X.read(il, self.n_train, len(self.tokens))

    def sequences(self, held_out: bool = True) -> list:
        """The held-out (or training) chunks as one-step sequences of layerwise.LayerPass."""
        r = range(self.n_train, len(self.tokens), self.chunk) if held_out else range(0, self.n_train, self.chunk)
        return [Sequence(self.tokens[s:s + self.chunk]) for s in r]

    def close(self):
        self.X.close()


def calibrate(model, tokenizer, text: str, n_tokens: int = 4096, chunk: int = 512,
              held_out: float = 0.25, on_layer=None, progress=None, release: bool = True,
              spill_dir=None, spill_owner=None) -> Calibration:
    """Collect FFN inputs for n_tokens of text (chunks of `chunk` tokens, BOS per chunk if the model
    adds it, as in perplexity), layer-major. The last `held_out` fraction of chunks is kept for
    evaluation. on_layer(il, X (n_tokens, n_embd) f32, n_train) after each layer, while its weights
    are resident; progress(il + 1, n_layer)."""
    ids = tokenizer.encode(text, add_special=False, parse_special=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    per = chunk - len(bos)
    n_chunks = min(max(n_tokens // chunk, 2), len(ids) // per)
    if n_chunks < 2:
        raise InvalidArgumentError(f"calibration text too short: {len(ids)} tokens, need at least {2 * per}")
    cfg = model.cfg
    total = n_chunks * chunk
    toks = np.concatenate([np.asarray(bos + ids[c * per:(c + 1) * per], np.int64) for c in range(n_chunks)])
    X = LayerFile(cfg.n_layer, total, cfg.n_embd, spill_dir, spill_owner)
    n_held = max(1, int(round(n_chunks * held_out)))
    n_train = (n_chunks - n_held) * chunk

    def layer_done(il, Xl):
        X.write(il, Xl)
        if on_layer:
            on_layer(il, Xl, n_train)
        if progress:
            progress(il + 1, cfg.n_layer)

    try:
        H = LayerPass(model, release).run([Sequence(toks[c * chunk:(c + 1) * chunk]) for c in range(n_chunks)],
                                          on_layer=layer_done, capture=True)
    except BaseException:
        X.close()
        raise
    return Calibration(X, toks, n_train, chunk, H.astype(np.float16))
