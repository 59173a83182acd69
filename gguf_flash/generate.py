"""Generation as a chain of small verbs (gpt-fast): prefill -> decode one -> decode n -> generate.
Also timing stats; chat templates are in chat_template.py (render_chat is re-exported here)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .chat_template import CHATML_TEMPLATE, render_chat  # noqa: F401 - re-exported (engine, tests)
from .errors import ContextOverflowError, GGUFFlashError, GGUFFormatError
from .sampling import GREEDY, Sampler, SamplingParams
from .tokenizer import StreamDecoder


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list = field(default_factory=list)
    n_prompt: int = 0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = "length"       # "length", "eog", "stop", "error"
    per_token: list = field(default_factory=list)   # optional per-token stats (flash mode)

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill's logits: decode steps = tokens - 1
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else 0.0


def prefill(model, prompt_ids, pos0: int = 0):
    """Logits of the last prompt token; the KV cache holds the whole prompt."""
    if not prompt_ids:
        raise GGUFFormatError("empty prompt: nothing to condition on")
    return model.prefill(prompt_ids, pos0)


def decode_one(model, sampler: Sampler, logits, history) -> int:
    return sampler.sample(logits, history)


def generate_tokens(model, prompt_ids, n_predict: int, sampler: Sampler, eog_ids=frozenset(),
                    result: GenerationResult | None = None):
    """Yields generated token ids; `result` collects timing. Stops at n_predict, an end-of-generation
    token (not yielded), or the context's end."""
    res = result if result is not None else GenerationResult()
    res.n_prompt = len(prompt_ids)
    if len(prompt_ids) > model.n_ctx:
        raise ContextOverflowError(f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                                   f"{model.n_ctx} (use -c to enlarge it)")
    t0 = time.perf_counter()
    set_need = getattr(model, "set_head_need", None)   # a flash model's head index reads what the sampler needs
    if set_need is not None:
        from .flash.head_index import need_for
        set_need(need_for(sampler.p))
    try:
        yield from _decode(model, prompt_ids, n_predict, sampler, eog_ids, res, t0)
    finally:
        if set_need is not None:
            from .flash.head_index import EXACT
            set_need(EXACT)


def _decode(model, prompt_ids, n_predict, sampler, eog_ids, res, t0):
    logits = prefill(model, prompt_ids)
    res.prompt_s = time.perf_counter() - t0
    history = list(prompt_ids)
    pos = len(prompt_ids)
    t0 = time.perf_counter()
    for i in range(n_predict):
        tok = decode_one(model, sampler, logits, history)
        if tok in eog_ids:
            res.stop_reason = "eog"
            break
        res.tokens.append(tok)
        history.append(tok)
        yield tok
        if i == n_predict - 1:
            break
        if pos >= model.n_ctx:
            res.stop_reason = "context"
            break
        logits = model.forward(tok, pos)
        pos += 1
    res.decode_s = time.perf_counter() - t0


def stream_text(model, tokenizer, prompt_ids, n_predict: int, params: SamplingParams = GREEDY,
                stop=(), ignore_eos: bool = False, result: GenerationResult | None = None):
    """Yields text pieces as they become printable; stops at a stop string (not yielded).
    `result` (if given) receives the tokens, full text and timing."""
    res = result if result is not None else GenerationResult()
    sampler = Sampler(params)
    dec = StreamDecoder(tokenizer)
    stop = [s for s in stop if s]
    eog = frozenset() if ignore_eos else tokenizer.eog_ids
    held = ""  # text withheld while it could be the start of a stop string
    for tok in generate_tokens(model, prompt_ids, n_predict, sampler, eog, res):
        held += dec.push(tok)
        hit = min((held.find(s) for s in stop if s in held), default=-1)
        if hit >= 0:
            held = held[:hit]
            res.stop_reason = "stop"
            break
        partial = max((k for k in range(1, len(held) + 1) if any(s.startswith(held[-k:]) for s in stop)),
                      default=0)
        if len(held) > partial:
            piece, held = held[:len(held) - partial], held[len(held) - partial:]
            res.text += piece
            yield piece
    if res.stop_reason != "stop":
        held += dec.flush()
    if held:
        res.text += held
        yield held


def carry_partial(e: GGUFFlashError, res: GenerationResult) -> None:
    """An error that ended a generation (the cap hit, the flash file truncated) hands back what was
    generated before it: the tokens and the text streamed so far."""
    e.tokens, e.text = list(res.tokens), res.text


def generate(model, tokenizer, prompt_ids, n_predict: int = 128, params: SamplingParams = GREEDY,
             stop=(), on_text=None, ignore_eos: bool = False) -> GenerationResult:
    """Generate text; on_text(piece) is called as text becomes printable. A GGUFFlashError raised
    midway carries the tokens and text generated before it (carry_partial)."""
    res = GenerationResult()
    try:
        for piece in stream_text(model, tokenizer, prompt_ids, n_predict, params, stop, ignore_eos, res):
            if on_text:
                on_text(piece)
    except GGUFFlashError as e:
        carry_partial(e, res)
        raise
    return res
