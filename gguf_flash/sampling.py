"""Samplers with llama.cpp's defaults and order: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw (llama.cpp common/sampling.cpp). temperature <= 0 is greedy. Seeds are explicit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self):
        if self.temperature < 0:
            raise InvalidArgumentError(f"--temp must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgumentError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise InvalidArgumentError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        return self


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams = GREEDY):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history) -> np.ndarray:
        """llama.cpp's repetition penalty over the last repeat_last_n distinct tokens (in place)."""
        if self.p.repeat_penalty == 1.0 or not history:
            return logits
        recent = np.unique(np.asarray(history[-self.p.repeat_last_n:], dtype=np.int64))
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / self.p.repeat_penalty, vals * self.p.repeat_penalty)
        return logits

    def sample(self, logits: np.ndarray, history=()) -> int:
        """One token id from logits (n_vocab,) f32; `logits` may be modified."""
        logits = self.penalize(logits, list(history))
        if self.p.temperature <= 0.0:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def distribution(self, logits: np.ndarray):
        """(ids, probs): the candidates a temperature > 0 draws from, best first, and their probabilities
        (top-k, then top-p, then min-p, then the temperature, as llama.cpp's default chain)."""
        k = self.p.top_k if 0 < self.p.top_k < logits.shape[0] else logits.shape[0]
        ids = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
        ids = ids[np.argsort(-logits[ids], kind="stable")]        # candidates, best first
        z = logits[ids].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if self.p.top_p < 1.0:                                    # smallest prefix with mass >= top_p
            keep = int(np.searchsorted(np.cumsum(probs), self.p.top_p) + 1)
            ids, z, probs = ids[:keep], z[:keep], probs[:keep]
        if self.p.min_p > 0.0:                                    # drop p < min_p * p_max
            keep = probs >= self.p.min_p * probs[0]
            ids, z = ids[keep], z[keep]
        z = z / self.p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return ids, probs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
