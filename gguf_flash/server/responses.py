"""OpenAI's response objects from the worker's events: chat.completion, chat.completion.chunk,
text_completion; finish_reason, usage (with prompt_tokens_details.cached_tokens and llama-server's
prompt_tokens_cached) and logprobs in both the chat and the legacy completions shapes."""

from __future__ import annotations

import time
import uuid

from .worker import DoneEvent, TokenEvent


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _chat_logprob(lp: dict) -> dict:
    return {"token": _text(lp["bytes"]), "logprob": lp["logprob"], "bytes": list(lp["bytes"]),
            "top_logprobs": [{"token": _text(b), "logprob": v, "bytes": list(b)} for _, v, b in lp["top"]]}


class Formatter:
    """Builds the JSON bodies of one request."""

    def __init__(self, endpoint: str, model_id: str, llm, req):
        self.endpoint, self.model, self.llm, self.req = endpoint, model_id, llm, req
        self.chat = endpoint == "chat/completions"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0                      # text offset, for legacy logprobs

    def usage(self, done: DoneEvent) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
                "prompt_tokens_cached": done.cached_tokens}

    def timings(self, done: DoneEvent) -> dict:
        # llama-server's extra block: prompt = the part actually prefilled
        n_new = done.prompt_tokens - done.cached_tokens
        n_dec = max(done.completion_tokens - 1, 0)
        return {"prompt_n": n_new, "prompt_ms": 1000 * done.prompt_s, "predicted_n": done.completion_tokens,
                "predicted_ms": 1000 * done.decode_s,
                "predicted_per_second": n_dec / done.decode_s if done.decode_s > 0 else 0.0}

    def _legacy_logprobs(self, tokens) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in tokens:
            if ev.logprob is None:
                continue
            lp = ev.logprob
            out["tokens"].append(_text(lp["bytes"]))
            out["token_logprobs"].append(lp["logprob"])
            out["top_logprobs"].append({_text(b): v for _, v, b in lp["top"]})
            out["text_offset"].append(self.offset)
            self.offset += len(ev.text)
        return out

    def _finish(self, done: DoneEvent) -> str:
        return "length" if done.finish_reason == "cancelled" else done.finish_reason

    # ---- one response ----

    def full(self, tokens: list, done: DoneEvent) -> dict:
        text = "".join(ev.text for ev in tokens)
        if self.chat:
            lp = {"content": [_chat_logprob(ev.logprob) for ev in tokens if ev.logprob]} if self.req.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": self._finish(done)}
            obj = "chat.completion"
        else:
            if self.req.echo:
                text = self.llm.detokenize(self.req.prompt_ids) + text
            choice = {"index": 0, "text": text, "logprobs": self._legacy_logprobs(tokens) if self.req.logprobs
                      else None, "finish_reason": self._finish(done)}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(done), "timings": self.timings(done)}

    # ---- server-sent events ----

    def _chunk(self, choice: dict | None, usage=None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [] if choice is None else [choice]}
        if self.req.include_usage:
            out["usage"] = usage
        return out

    def first_chunk(self) -> dict:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None})
        return self._chunk({"index": 0, "text": self.llm.detokenize(self.req.prompt_ids) if self.req.echo
                            else "", "logprobs": None, "finish_reason": None})

    def chunk(self, ev: TokenEvent) -> dict | None:
        if not ev.text and ev.logprob is None:
            return None
        if self.chat:
            lp = {"content": [_chat_logprob(ev.logprob)]} if ev.logprob else None
            return self._chunk({"index": 0, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None})
        lp = self._legacy_logprobs([ev]) if ev.logprob else None
        return self._chunk({"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None})

    def last_chunks(self, done: DoneEvent) -> list:
        delta = {"delta": {}} if self.chat else {"text": ""}
        out = [self._chunk({"index": 0, **delta, "logprobs": None, "finish_reason": self._finish(done)})]
        if self.req.include_usage:
            out.append(self._chunk(None, self.usage(done)))
        return out
