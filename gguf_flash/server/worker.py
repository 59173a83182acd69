"""One worker thread: loads the model, then runs generations one at a time in arrival order from a
bounded queue. The KV cache keeps the last conversation: a prompt that starts with the tokens already in
the cache prefills only the rest (Model.prefill / FlashModel.prefill at pos0 = common prefix).

The thread that loads the model is the thread that runs it: numba's thread count (-t) is per thread."""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GGUFFlashError, GGUFFormatError
from ..sampling import Sampler, log_softmax
from ..tokenizer import StreamDecoder

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    text: str                      # printable text this token completed ("" while a character is split)
    token: int
    logprob: dict | None = None    # {"token", "logprob", "bytes", "top": [(token_id, logprob), ...]}


@dataclass
class DoneEvent:
    finish_reason: str             # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    text: str
    prompt_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class ErrorEvent:
    error: Exception


@dataclass
class Job:
    """A queued generation; `emit` is called from the worker thread with each event."""
    req: object                    # schema.GenRequest
    emit: object                   # callable(event), thread-safe
    constraint: object = None      # grammar.Constraint or None
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    pass


class Worker:
    """Owns the model. submit() from any thread; events go back through each job's emit."""

    def __init__(self, loader, max_queue: int, on_loaded=None):
        self.loader, self.on_loaded = loader, on_loaded
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.llm = None
        self.load_error: Exception | None = None
        self.loaded = threading.Event()
        self.busy = False
        self.cache_ids: list = []      # token ids whose K/V are in the model's cache, positions 0..n-1
        self.thread = threading.Thread(target=self._run, name="gguf-flash-worker", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    # ---- the thread ----

    def _run(self):
        try:
            self.llm = self.loader()
        except BaseException as e:  # noqa: BLE001 - reported by the caller (cli prints one line)
            self.load_error = e
            self.loaded.set()
            if self.on_loaded:
                self.on_loaded(None, e)
            return
        # the model, numba and the vocabulary are ~1M long-lived objects: keep the cyclic GC from walking
        # them again whenever request handling allocates (a full pass costs ~0.15 s, mid-generation)
        gc.collect()
        gc.freeze()
        self.loaded.set()
        if self.on_loaded:
            self.on_loaded(self.llm, None)
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._generate(job)
            except GGUFFlashError as e:
                self.cache_ids = []
                if isinstance(e, GGUFFormatError):   # the model's file failed (truncated, EIO): say so here too
                    log.error("generation failed: %s", e)
                job.emit(ErrorEvent(e))
            except Exception as e:  # noqa: BLE001 - the server must outlive any one request
                log.exception("generation failed")
                self.cache_ids = []
                try:
                    job.emit(ErrorEvent(e))
                except RuntimeError:      # the event loop is closed: the server is shutting down
                    return
            finally:
                self.busy = False

    def _prefill(self, ids: list):
        """Logits (n_vocab,) after ids, reusing the cached prefix; returns (logits, n_cached)."""
        model = self.llm.model
        common = 0
        for a, b in zip(self.cache_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)     # the last prompt token always runs: its logits are needed
        self.cache_ids = self.cache_ids[:common]   # what stays valid if the prefill fails midway
        logits = model.prefill(ids[common:], common)
        self.cache_ids = list(ids)
        return logits, common

    def _generate(self, job: Job):
        generated: list = []          # filled by _generate_into as tokens are sampled
        try:
            self._generate_into(job, generated)
        except GGUFFlashError as e:   # e.g. the flash file truncated midway: say how far it got
            e.tokens = list(generated)
            raise

    def _generate_into(self, job: Job, generated: list):
        """A flash model's head index reads only the rows the sampler can pick: not with logprobs (they
        are the whole distribution's) nor a grammar (it may mask the rows read), which read the whole head."""
        set_need = getattr(self.llm.model, "set_head_need", None)
        if set_need is None:
            return self._sample_into(job, generated)
        from ..flash.head_index import EXACT, need_for
        exact = job.req.logprobs or job.constraint is not None
        set_need(EXACT if exact else need_for(job.req.params))
        try:
            return self._sample_into(job, generated)
        finally:
            set_need(EXACT)

    def _sample_into(self, job: Job, generated: list):
        req, model, tok = job.req, self.llm.model, self.llm.tokenizer
        ids = list(req.prompt_ids)
        t0 = time.perf_counter()
        logits, cached = self._prefill(ids)
        prompt_s = time.perf_counter() - t0
        sampler = Sampler(req.params)
        dec = StreamDecoder(tok)
        eog = frozenset() if req.ignore_eos else tok.eog_ids
        stops = list(req.stop)
        budget = model.n_ctx - len(ids)
        n_max = budget if req.max_tokens is None else min(req.max_tokens, budget)
        history = list(ids)
        text, held, reason = "", "", "length"    # reason: length, eog, stop, grammar, cancelled
        t0 = time.perf_counter()
        while len(generated) < n_max:
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            raw = log_softmax(logits) if req.logprobs else None   # (n_vocab,) f64, the model's own
            if job.constraint is not None:
                job.constraint.mask(logits)
            t = sampler.sample(logits, history)
            if t in eog:
                reason = "eog"
                break
            if job.constraint is not None:
                job.constraint.consume(t)
            generated.append(t)
            history.append(t)
            lp = _logprob(tok, raw, t, req.top_logprobs) if raw is not None else None
            # stop strings: hold back text that could begin one; cut at the first full match
            held += dec.push(t)
            hit = min((held.find(s) for s in stops if s in held), default=-1)
            if hit >= 0:
                text += held[:hit]
                job.emit(TokenEvent(held[:hit], t, lp))
                held, reason = "", "stop"
                break
            keep = max((k for k in range(1, len(held) + 1) if any(s.startswith(held[-k:]) for s in stops)),
                       default=0)
            out, held = held[:len(held) - keep], held[len(held) - keep:]
            text += out
            job.emit(TokenEvent(out, t, lp))
            if job.constraint is not None and job.constraint.done():
                reason = "grammar"
                break
            if len(generated) == n_max:
                break
            logits = model.forward(t, len(history) - 1)
            self.cache_ids.append(t)
        if reason != "stop":
            held += dec.flush()
        if held:
            text += held
            job.emit(TokenEvent(held, -1, None))
        finish = {"eog": "stop", "stop": "stop", "grammar": "stop"}.get(reason, reason)
        job.emit(DoneEvent(finish, len(ids), cached, len(generated), text, prompt_s,
                           time.perf_counter() - t0))


def _logprob(tok, raw: np.ndarray, t: int, top: int) -> dict:
    """OpenAI's logprob entry for token t from the model's log-probabilities raw (n_vocab,)."""
    entry = {"token_id": t, "logprob": float(raw[t]), "bytes": tok.token_bytes(t), "top": []}
    if top:
        best = np.argpartition(-raw, top - 1)[:top]
        best = best[np.argsort(-raw[best], kind="stable")]
        entry["top"] = [(int(i), float(raw[i]), tok.token_bytes(int(i))) for i in best]
    return entry
