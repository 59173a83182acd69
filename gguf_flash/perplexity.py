"""Perplexity with the chunking of ../shared/reference/README.md (llama.cpp's numbers).

The text is tokenized without BOS and without special-token parsing and cut into consecutive chunks of
`chunk` tokens. Each chunk runs in a fresh context, with BOS prepended when the model adds BOS; every
chunk token that has a preceding input position is scored: ppl = exp(mean NLL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_scored: int
    n_tokens: int
    chunk_ppl: list


def rows_nll(z, targets) -> float:
    """Sum over rows of -log softmax(z[k])[targets[k]]: z (m, n_vocab) f32 logits, targets (m,) int."""
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0].astype(np.float64) + np.log(np.exp(z - zmax).sum(axis=1, dtype=np.float64))
    return -float((z[np.arange(len(z)), targets] - lse).sum())


def chunk_nll(model, inp) -> tuple[float, int]:
    """Sum of -log p(inp[p+1] | inp[:p+1]) over a fresh context fed `inp`, and the count scored."""
    inp = np.asarray(inp, np.int64)
    nll, n = 0.0, 0
    for start, logits in model.prefill(inp, 0, logits_rows="all"):
        targets = np.arange(start, start + len(logits)) + 1   # position p predicts input p + 1
        keep = np.flatnonzero(targets < len(inp))
        # a few rows at a time: temporaries of ~1 MiB (a flash model under a cap has no room planned
        # for (m, n_vocab) of them)
        step = max(1, (1 << 18) // logits.shape[1])
        for k in range(0, len(keep), step):
            rows = keep[k:k + step]
            nll += rows_nll(logits[rows], inp[targets[rows]])
            n += len(rows)
    return nll, n


def perplexity(llm, text: str, chunk: int = 512, max_chunks: int | None = None, progress=None) -> PerplexityResult:
    tok = llm.tokenizer
    ids = tok.encode(text, add_special=False, parse_special=False)
    add_bos = bool(tok.add_bos) and tok.bos_id is not None
    if chunk < 2 or chunk + add_bos > llm.model.n_ctx:
        raise InvalidArgumentError(f"perplexity chunk {chunk} must be >= 2 and fit the context "
                                   f"({llm.model.n_ctx})")
    starts = list(range(0, len(ids), chunk))[:max_chunks]
    total, n_scored, chunk_ppl = 0.0, 0, []
    for ci, s in enumerate(starts):
        nll, n = chunk_nll(llm.model, ([tok.bos_id] if add_bos else []) + ids[s:s + chunk])
        total += nll
        n_scored += n
        chunk_ppl.append(float(np.exp(nll / max(n, 1))))
        if progress:
            progress(ci + 1, len(starts), float(np.exp(total / max(n_scored, 1))))
    mean = total / max(n_scored, 1)
    return PerplexityResult(float(np.exp(mean)), float(mean), n_scored, len(ids), chunk_ppl)
