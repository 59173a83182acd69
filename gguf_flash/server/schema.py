"""Request validation for the OpenAI-compatible endpoints: JSON bodies -> typed requests, or an APIError
that becomes OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status.

Unknown fields are ignored (clients send fields a local server has no use for); a known field of the
wrong type or out of range is refused, naming the endpoint, the field and the problem."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..sampling import SamplingParams


class APIError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        message = " ".join(str(message).split())       # one line, whatever a template error held
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """What the worker needs for one generation (chat or completion)."""
    endpoint: str                      # "chat" | "completions"
    prompt_ids: list                   # token ids, already through the chat template for chat
    max_tokens: int | None             # None: until end of generation or the context is full
    params: SamplingParams
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None  # {"type": "json_object" | "json_schema" | "grammar", ...}
    ignore_eos: bool = False
    model: str = ""
    echo: bool = False                  # completions: put the prompt before the text


# ---- field checks ------------------------------------------------------------------------------

_MISSING = object()


def parse_body(raw: bytes, endpoint: str) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"{endpoint}: the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"{endpoint}: the body must be a JSON object, got {type(body).__name__}",
                       code="invalid_type")
    return body


class _Fields:
    """Typed access to a request body; every problem is an APIError naming endpoint and field."""

    def __init__(self, body: dict, endpoint: str):
        self.body, self.endpoint = body, endpoint

    def bad(self, name, problem):
        return APIError(400, f"{self.endpoint}: '{name}' {problem}", param=name, code="invalid_value")

    def get(self, name, kinds, default=None, nullable=True):
        v = self.body.get(name, _MISSING)
        if v is _MISSING or (v is None and nullable):
            return default
        # bool is an int in Python; JSON true is not a number
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            want = " or ".join("boolean" if k is bool else "integer" if k is int else "number" if k is float
                               else "string" if k is str else "array" if k is list else "object" for k in kinds)
            raise APIError(400, f"{self.endpoint}: '{name}' must be {want}, got {json.dumps(v)[:60]}",
                           param=name, code="invalid_type")
        if isinstance(v, float) and not math.isfinite(v):
            raise self.bad(name, "must be finite")
        return v

    def number(self, name, default, lo, hi, lo_open=False):
        v = self.get(name, (int, float), default)
        if v is None:
            return None
        if v < lo or (lo_open and v == lo) or v > hi:
            raise self.bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return float(v)

    def integer(self, name, default, lo, hi=2**63 - 1):
        v = self.get(name, (int,), default)
        if v is not None and not lo <= v <= hi:
            raise self.bad(name, f"must be an integer in [{lo}, {hi}], got {v}")
        return v


def _sampling(f: _Fields) -> SamplingParams:
    # absent fields take llama-server's defaults (sampling.SamplingParams), not OpenAI's temperature 1
    d = SamplingParams()
    seed = f.integer("seed", None, -2**63)
    return SamplingParams(
        temperature=f.number("temperature", d.temperature, 0.0, 2.0),
        top_k=f.integer("top_k", d.top_k, 0),
        top_p=f.number("top_p", d.top_p, 0.0, 1.0, lo_open=True),
        min_p=f.number("min_p", d.min_p, 0.0, 1.0),
        repeat_penalty=f.number("repeat_penalty", d.repeat_penalty, 0.0, 10.0, lo_open=True),
        repeat_last_n=f.integer("repeat_last_n", d.repeat_last_n, 0),
        seed=None if seed is None or seed < 0 else seed % 2**63)


def _stop(f: _Fields) -> list:
    v = f.get("stop", (str, list), [])
    if isinstance(v, str):
        return [v]
    if len(v) > 16 or not all(isinstance(s, str) for s in v):
        raise f.bad("stop", "must be a string or a list of at most 16 strings")
    return [s for s in v if s]


def _response_format(f: _Fields) -> dict | None:
    rf = f.get("response_format", (dict,))
    grammar = f.get("grammar", (str,))          # llama-server's extension: a GBNF grammar
    if grammar is not None:
        return {"type": "grammar", "grammar": grammar}
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")               # llama-server also accepts a schema here
        if schema is not None and not isinstance(schema, dict):
            raise f.bad("response_format", "schema must be an object")
        return {"type": "json_schema", "schema": schema or {"type": "object"}}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise f.bad("response_format", "json_schema must be an object with a 'schema' object")
        return {"type": "json_schema", "schema": js.get("schema") or {"type": "object"}}
    raise f.bad("response_format", f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _max_tokens(f: _Fields):
    v = f.integer("max_completion_tokens", None, 0)
    if v is None:
        v = f.integer("max_tokens", None, 0)
    return v


def _common(f: _Fields, endpoint: str, prompt_ids: list) -> GenRequest:
    n = f.integer("n", 1, 1)
    if n != 1:
        raise f.bad("n", f"must be 1 (one generation at a time on this server), got {n}")
    opts = f.get("stream_options", (dict,), {})
    stream = f.get("stream", (bool,), False)
    return GenRequest(endpoint=endpoint, prompt_ids=prompt_ids, max_tokens=_max_tokens(f),
                      params=_sampling(f), stop=_stop(f), stream=stream,
                      include_usage=bool(stream and opts.get("include_usage")),
                      response_format=_response_format(f), ignore_eos=f.get("ignore_eos", (bool,), False),
                      model=f.get("model", (str,), ""))


# ---- endpoints ---------------------------------------------------------------------------------


def _message_text(f: _Fields, i: int, m) -> dict:
    if not isinstance(m, dict):
        raise f.bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
    role, content = m.get("role"), m.get("content", "")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise f.bad(f"messages[{i}].role", f"must be system, developer, user, assistant or tool, got {role!r}")
    if content is None:
        content = ""
    if isinstance(content, list):                # content parts: only text is understood here
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise f.bad(f"messages[{i}].content", "parts must be {'type': 'text', 'text': string}")
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise f.bad(f"messages[{i}].content", "must be a string or a list of text parts")
    return {"role": "system" if role == "developer" else role, "content": content}


def chat_request(body: dict, llm) -> GenRequest:
    """POST /v1/chat/completions -> GenRequest (the messages through the GGUF's chat template)."""
    f = _Fields(body, "chat/completions")
    msgs = f.get("messages", (list,), None, nullable=False)
    if msgs is None:
        raise APIError(400, "chat/completions: 'messages' is required", param="messages", code="missing")
    if not msgs:
        raise f.bad("messages", "must not be empty")
    messages = [_message_text(f, i, m) for i, m in enumerate(msgs)]
    req = _common(f, "chat/completions", [])
    req.prompt_ids = llm.chat_ids(messages)
    top = f.integer("top_logprobs", None, 0, 20)
    req.logprobs = bool(f.get("logprobs", (bool,), False))
    req.top_logprobs = top or 0
    if top and not req.logprobs:
        raise f.bad("top_logprobs", "needs 'logprobs': true")
    return req


def completion_request(body: dict, llm) -> GenRequest:
    """POST /v1/completions -> GenRequest (a string prompt, or token ids, with the model's BOS rule)."""
    f = _Fields(body, "completions")
    prompt = f.get("prompt", (str, list), None, nullable=False)
    if prompt is None:
        raise APIError(400, "completions: 'prompt' is required", param="prompt", code="missing")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise f.bad("prompt", "must be a string or a list of token ids (one prompt per request)")
    ids = llm.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    n_vocab = llm.cfg.n_vocab
    if not ids:
        raise f.bad("prompt", "is empty")
    if any(not 0 <= t < n_vocab for t in ids):
        raise f.bad("prompt", f"token ids must be in [0, {n_vocab})")
    req = _common(f, "completions", ids)
    lp = f.integer("logprobs", None, 0, 20)
    req.logprobs, req.top_logprobs = lp is not None, lp or 0
    req.echo = f.get("echo", (bool,), False)
    if req.max_tokens is None and "max_tokens" not in body:
        req.max_tokens = 16                        # OpenAI's default for completions
    return req


def tokenize_request(body: dict) -> tuple:
    f = _Fields(body, "tokenize")
    content = f.get("content", (str,), None, nullable=False)
    if content is None:
        raise APIError(400, "tokenize: 'content' is required", param="content", code="missing")
    return content, f.get("add_special", (bool,), False), f.get("parse_special", (bool,), True), \
        f.get("with_pieces", (bool,), False)


def detokenize_request(body: dict, n_vocab: int) -> list:
    f = _Fields(body, "detokenize")
    tokens = f.get("tokens", (list,), None, nullable=False)
    if tokens is None:
        raise APIError(400, "detokenize: 'tokens' is required", param="tokens", code="missing")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
        raise f.bad("tokens", f"must be a list of token ids in [0, {n_vocab})")
    return tokens
