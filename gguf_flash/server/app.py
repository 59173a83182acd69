"""The HTTP side of `gguf-flash serve`: an OpenAI-compatible ASGI app (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
POST /tokenize, POST /detokenize (llama-server's shapes). Requests are validated here (schema.py) and
queued to the one worker thread (worker.py); the event loop only moves events, so /health answers
while a request generates. Every error is OpenAI's error object; no traceback reaches a client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import ContextOverflowError, GGUFFlashError, GGUFFormatError, InvalidArgumentError
from . import schema
from .responses import Formatter
from .schema import APIError
from .worker import DoneEvent, ErrorEvent, Job, QueueFull, TokenEvent, Worker

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20      # bytes; a 4 MiB body is far more text than any context here holds
DRAIN_BODY = 64 << 20   # bytes of a refused body read (and dropped) before answering 413


@dataclass
class ServerConfig:
    model_ids: tuple           # accepted names for "model"; the first is what /v1/models lists
    api_key: str | None = None
    max_queue: int = 8


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    """Holds the worker and builds the ASGI app. `loader(on_tokenizer)` returns an engine.LLM (passing
    on_tokenizer to gguf_flash.load); it runs on the worker thread, after this module (and so the web
    stack) is imported."""

    def __init__(self, loader, cfg: ServerConfig, on_loaded=None):
        self.cfg = cfg
        self.grammar = None          # grammar.GrammarTokenizer, built after the model
        self._user_on_loaded = on_loaded
        self.worker = Worker(self._load(loader), cfg.max_queue, self._on_loaded)
        self.created = int(time.time())
        self._open: dict = {}        # id(job) -> (job, its events queue, endpoint): requests not yet answered
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/completions", self.completions, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._internal})

    def _load(self, loader):
        try:
            from .grammar import GrammarTokenizer
        except ImportError:
            GrammarTokenizer = None
            log.warning("llguidance is not installed: response_format json_* is refused "
                        "(pip install 'gguf-flash[serve]')")

        def on_tokenizer(tokenizer, f):
            # built before the model, so a flash plan (which measures RSS after loading its kernels)
            # counts the grammar library's vocabulary in the runtime's baseline
            if GrammarTokenizer is not None:
                from ..config import config_from_gguf
                self.grammar = GrammarTokenizer(tokenizer, config_from_gguf(f).n_vocab)

        return lambda: loader(on_tokenizer)

    def _on_loaded(self, llm, error):
        if self._user_on_loaded:
            self._user_on_loaded(llm, error)

    # ---- plumbing ----

    async def _not_found(self, request, exc):
        return _error_response(APIError(404, f"{request.url.path}: no such endpoint", code="not_found"))

    async def _not_allowed(self, request, exc):
        return _error_response(APIError(405, f"{request.method} {request.url.path}: method not allowed",
                                        code="method_not_allowed"))

    async def _internal(self, request, exc):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error_response(APIError(500, f"{request.url.path}: internal error ({type(exc).__name__})",
                                        type_="server_error", code="internal_error"))

    def _check(self, request: Request, endpoint: str):
        """API key, then readiness: raises APIError."""
        if self.cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.cfg.api_key}":
                raise APIError(401, f"{endpoint}: missing or wrong API key (Authorization: Bearer KEY)",
                               type_="authentication_error", code="invalid_api_key")
        if not self.worker.loaded.is_set() or self.worker.llm is None:
            raise APIError(503, f"{endpoint}: the model is loading", type_="unavailable_error",
                           code="loading", headers={"Retry-After": "1"})

    async def _body(self, request: Request, endpoint: str) -> dict:
        """The JSON body, refused past MAX_BODY bytes (it is read into the capped process's memory).
        A body over the limit is still read, and dropped, up to DRAIN_BODY bytes before the 413: a server
        that answers and closes while the client is still sending makes the client's socket see a reset
        instead of the answer (a 5 MiB body got ECONNRESET in some runs of the suite)."""
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n <= MAX_BODY:
                chunks.append(chunk)
            elif chunks:
                chunks = []          # over the limit: keep nothing, read on
            if n > DRAIN_BODY:
                break
        if n > MAX_BODY:
            raise APIError(413, f"{endpoint}: the body is larger than {MAX_BODY >> 20} MiB", code="body_too_large")
        return schema.parse_body(b"".join(chunks), endpoint)

    def _check_model(self, name: str, endpoint: str):
        if name and name not in self.cfg.model_ids:
            raise APIError(404, f"{endpoint}: model {name!r} is not served here (this server has "
                                f"{self.cfg.model_ids[0]!r})", param="model", code="model_not_found")

    # ---- simple endpoints ----

    async def health(self, request: Request):
        if not self.worker.loaded.is_set():
            return JSONResponse({"error": {"message": "Loading model", "type": "unavailable_error",
                                           "param": None, "code": 503}}, status_code=503)
        if self.worker.llm is None:
            return JSONResponse({"error": {"message": "model failed to load", "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)
        if self.worker.llm.fault is not None:
            return JSONResponse({"error": {"message": _fault_message(self.worker.llm), "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)
        return JSONResponse({"status": "ok", "busy": self.worker.busy, "queued": self.worker.jobs.qsize(),
                             "cached_tokens": len(self.worker.cache_ids)})

    async def models(self, request: Request):
        try:
            self._check(request, "models")
        except APIError as e:
            return _error_response(e)
        llm = self.worker.llm
        return JSONResponse({"object": "list", "data": [{
            "id": self.cfg.model_ids[0], "object": "model", "created": self.created, "owned_by": "gguf-flash",
            "meta": {"n_vocab": llm.cfg.n_vocab, "n_ctx": llm.model.n_ctx, "n_ctx_train": llm.cfg.n_ctx_train,
                     "n_embd": llm.cfg.n_embd, "path": str(llm.path)}}]})

    async def tokenize(self, request: Request):
        try:
            self._check(request, "tokenize")
            content, add_special, parse_special, with_pieces = schema.tokenize_request(
                await self._body(request, "tokenize"))
        except APIError as e:
            return _error_response(e)
        llm = self.worker.llm
        ids = llm.tokenize(content, add_special=add_special, parse_special=parse_special)
        if not with_pieces:
            return JSONResponse({"tokens": ids})
        pieces = []
        for t in ids:
            b = llm.tokenizer.token_bytes(t, special=True)
            try:
                pieces.append({"id": t, "piece": b.decode("utf-8")})
            except UnicodeDecodeError:
                pieces.append({"id": t, "piece": list(b)})
        return JSONResponse({"tokens": pieces})

    async def detokenize(self, request: Request):
        try:
            self._check(request, "detokenize")
            ids = schema.detokenize_request(await self._body(request, "detokenize"), self.worker.llm.cfg.n_vocab)
        except APIError as e:
            return _error_response(e)
        return JSONResponse({"content": self.worker.llm.detokenize(ids)})

    # ---- generation ----

    def _request(self, body: dict, endpoint: str):
        """Validate a generation request into a Job (not yet queued)."""
        llm = self.worker.llm
        try:
            req = (schema.chat_request if endpoint == "chat/completions" else schema.completion_request)(body, llm)
        except (GGUFFormatError, InvalidArgumentError) as e:   # e.g. the chat template raised
            raise APIError(400, f"{endpoint}: {e}") from None
        self._check_model(req.model, endpoint)
        n_ctx = llm.model.n_ctx
        if len(req.prompt_ids) >= n_ctx:
            raise APIError(400, f"{endpoint}: the prompt has {len(req.prompt_ids)} tokens, the context holds "
                                f"{n_ctx} (start the server with a larger -c)", param="messages"
                           if endpoint == "chat/completions" else "prompt", code="context_length_exceeded")
        constraint = None
        if req.response_format is not None:
            if self.grammar is None:
                raise APIError(400, f"{endpoint}: response_format needs llguidance "
                                    "(pip install 'gguf-flash[serve]')", param="response_format")
            constraint = self.grammar.matcher(req.response_format)
        return req, constraint

    async def chat(self, request: Request):
        return await self._generate(request, "chat/completions")

    async def completions(self, request: Request):
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            self._check(request, endpoint)
            if self.worker.llm.fault is not None:   # the model's file failed earlier: nothing can run
                raise APIError(500, f"{endpoint}: {_fault_message(self.worker.llm)}", type_="server_error",
                               code="model_file_fault")
            body = await self._body(request, endpoint)
            # template, tokenizer and grammar compilation run off the event loop (/health stays quick)
            req, constraint = await asyncio.to_thread(self._request, body, endpoint)
            job = Job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), constraint)
            self.worker.submit(job)
        except APIError as e:
            return _error_response(e)
        except QueueFull:
            return _error_response(APIError(
                503, f"{endpoint}: the server is busy ({self.cfg.max_queue} requests queued); retry later",
                type_="server_error", code="queue_full", headers={"Retry-After": "1"}))
        self._open[id(job)] = (job, events, endpoint)
        fmt = Formatter(endpoint, self.cfg.model_ids[0], self.worker.llm, req)
        if req.stream:
            return StreamingResponse(self._sse(job, events, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._collect(request, job, events, fmt)

    async def _collect(self, request: Request, job: Job, events: asyncio.Queue, fmt):
        """Non-streamed: gather the events; a client that goes away cancels the job."""
        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            job.cancelled.set()
        watcher = asyncio.create_task(watch())
        tokens = []
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    tokens.append(ev)
                elif isinstance(ev, DoneEvent):
                    return JSONResponse(fmt.full(tokens, ev))
                elif isinstance(ev, ErrorEvent):
                    return _error_response(_api_error(ev.error, fmt.endpoint))
        finally:
            watcher.cancel()
            job.cancelled.set()      # no-op when done; stops the generation when the handler is torn down
            self._open.pop(id(job), None)

    async def _sse(self, job: Job, events: asyncio.Queue, fmt):
        """Streamed: server-sent events ending with `data: [DONE]`. Closing the connection cancels the
        generator, and so the job, at the next token."""
        try:
            yield _sse(fmt.first_chunk())
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    chunk = fmt.chunk(ev)
                    if chunk is not None:
                        yield _sse(chunk)
                elif isinstance(ev, DoneEvent):
                    for chunk in fmt.last_chunks(ev):
                        yield _sse(chunk)
                    break
                elif isinstance(ev, ErrorEvent):
                    yield _sse(_api_error(ev.error, fmt.endpoint).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()
            self._open.pop(id(job), None)

    def close_requests(self) -> None:
        """Shutting down (Ctrl-C, SIGTERM): every open request is cancelled and answered now, 503, so the
        web server's graceful shutdown finds nothing to kill. Called on the event loop."""
        for job, events, endpoint in list(self._open.values()):
            job.cancelled.set()
            events.put_nowait(ErrorEvent(APIError(503, f"{endpoint}: the server is shutting down",
                                                  type_="unavailable_error", code="shutting_down")))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _fault_message(llm) -> str:
    return f"server-side fault: the model file {llm.path} failed while running ({llm.fault}); restart the server"


def _api_error(e: Exception, endpoint: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, f"{endpoint}: {e}", code="context_length_exceeded")
    if isinstance(e, GGUFFormatError):   # raised while generating: the model's file failed, not the request
        return APIError(500, f"{endpoint}: server-side fault after {len(e.tokens)} generated tokens: {e}",
                        type_="server_error", code="model_file_fault")
    if isinstance(e, GGUFFlashError):
        return APIError(500, f"{endpoint}: {e}", type_="server_error", code=type(e).__name__)
    return APIError(500, f"{endpoint}: internal error ({type(e).__name__})", type_="server_error",
                    code="internal_error")
