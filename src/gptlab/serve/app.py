"""The FastAPI application: OpenAI's completions, chat completions and models routes, health, the
playground's explain route and its static files.

Every bad request is answered with a 4xx and OpenAI's error object (protocol.ApiError); the model
only ever runs in the scheduler's thread, and the handlers only wait for its events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..model import GPTModel
from ..tokenizer import Tokenizer
from .chat import ChatFormat
from .protocol import ApiError, Limits, parse_body, parse_chat, parse_completion, parse_explain
from .responses import (
    Choice,
    Envelope,
    chat_chunk_choice,
    completion_chunk_choice,
    completion_logprobs,
    prompt_offsets,
    sse,
    usage,
)
from .runs import ClientGone, Run, unless_disconnected
from .scheduler import QueueFull, Scheduler, explain_job
from .sequence import Delta, PromptScores

log = logging.getLogger("gptlab.serve")

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/playground.css": ("playground.css", "text/css"),
          "/playground.js": ("playground.js", "text/javascript; charset=utf-8")}
STATIC_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                  "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; "
                  "style-src 'self'; connect-src 'self'"}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclasses.dataclass
class Served:
    """What the routes need: the model, its name, the scheduler, the limits and the chat format."""

    model: GPTModel
    name: str
    scheduler: Scheduler
    limits: Limits
    chat: ChatFormat
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's own tokenizer, the scheduler's: prompts are encoded and tokens shown with the one the
        generated text is decoded with."""
        return self.scheduler.tokenizer


class RequestLog:
    """ASGI middleware: one log line per request once its answer is complete (streams included)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            run = scope.get("state", {}).get("run")
            tokens = f" {run.prompt_tokens}+{run.completion_tokens} tokens" if run else ""
            note = " (client went away)" if run and run.cancelled else ""
            log.info("%s %s %s%s %.3fs%s", scope["method"], scope["path"], status or 499, tokens,
                     time.perf_counter() - start, note)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (read to its end, so the client sees the answer)."""
    size, chunks = 0, []
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    try:
        async for chunk in request.stream():
            size += len(chunk)
            too_big = too_big or size > limit
            if too_big and size > 64 * limit:  # stop reading a runaway upload; the connection then closes
                break
            if not too_big:
                chunks.append(chunk)
    except ClientDisconnect:  # the client left half-way through its body
        raise ClientGone from None
    if too_big:
        raise ApiError(f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                       status=413, code="request_too_large")
    return parse_body(b"".join(chunks))


def submit(served: Served, run: Run, request: Request) -> None:
    request.state.run = run
    try:
        served.scheduler.submit(run.jobs)
    except QueueFull as exc:
        raise ApiError(f"the server is busy: {exc}; retry later", status=429, type="rate_limit_error",
                       code="rate_limit_exceeded") from None


def create_app(served: Served) -> FastAPI:
    """The application; the scheduler's thread starts and stops with it (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.scheduler.start()
        yield
        await run_in_threadpool(served.scheduler.stop)

    # No /docs: FastAPI's pages load their scripts from a CDN, and the server must work offline.
    app = FastAPI(title="gptlab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(RequestLog)
    _add_error_handlers(app)
    _add_info_routes(app, served)
    _add_completions(app, served)
    _add_chat(app, served)
    return app


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        what = {404: f"no route {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(what, status=exc.status_code, code="not_found" if exc.status_code == 404
                                        else None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the log line says so

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error_response(ApiError(f"internal error: {type(exc).__name__}", status=500, type="server_error"))


def _add_info_routes(app: FastAPI, served: Served) -> None:
    static = resources.files("gptlab.serve") / "static"
    pages = {path: (static.joinpath(name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}

    def page(path: str):
        async def handler() -> Response:
            data, kind = pages[path]
            return Response(data, media_type=kind, headers=STATIC_HEADERS)
        return handler

    for path in STATIC:
        app.add_api_route(path, page(path), methods=["GET"])

    def model_card() -> dict:
        config = served.model.config
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "gptlab",
                "context_length": config.context_length, "vocab_size": config.vocab_size}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, **served.scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name != served.name:
            raise ApiError(f"The model {name!r} does not exist; this server serves {served.name!r}", "model",
                           status=404, code="model_not_found")
        return model_card()

    @app.post("/v1/explain")
    async def explain(request: Request) -> dict:
        body = await read_json(request, served.limits.max_body_bytes)
        req = await run_in_threadpool(parse_explain, body, served.limits, served.name, served.tokenizer)
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        work = explain_job(served.model, req.prompt, req.temperature, req.top_k, req.top_p, req.candidates,
                           served.tokenizer)
        served.scheduler.submit_explain(work, lambda result: loop.call_soon_threadsafe(answer.set_result, result))
        result = await answer
        if isinstance(result, Exception):
            raise result
        return result


def _add_completions(app: FastAPI, served: Served) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, served.limits.max_body_bytes)
        req = await run_in_threadpool(parse_completion, body, served.limits, served.name, served.tokenizer)
        samplings = [dataclasses.replace(req.sampling, max_tokens=m) for m in req.max_tokens]
        run = Run(req.prompts, samplings, served.name)
        submit(served, run, request)
        envelope = Envelope("text_completion", served.name)
        if req.stream:
            return StreamingResponse(_completion_stream(run, req, envelope, served.tokenizer),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        choices = await unless_disconnected(request.receive, run, _gather(run, req.echo, served.tokenizer))
        out = envelope(choices=[c.completion(req.sampling.logprobs is not None, req.return_token_ids)
                                for c in choices], usage=usage(run.prompt_tokens, run.completion_tokens))
        if req.return_prompt_ids or req.return_token_ids:
            out["prompt_token_ids"] = req.prompts[0] if len(req.prompts) == 1 else req.prompts
        return JSONResponse(out)


def _prompt_of(run: Run, index: int) -> list[int]:
    return run.jobs[index // run.jobs[0].sampling.n].prompt


async def _gather(run: Run, echo: bool, tokenizer: Tokenizer) -> list[Choice]:
    """Every choice of a non-streamed answer, echo (and the prompt's logprobs) included."""
    choices = [Choice(i, tokenizer) for i in range(run.total)]
    if echo:
        for i, choice in enumerate(choices):
            choice.prefix, choice.prefix_offsets = prompt_offsets(_prompt_of(run, i), tokenizer)
    async for event in run.events():
        if isinstance(event, PromptScores):
            for i in event.indices:
                choices[i].prefix_entries = event.logprobs
        else:
            choices[event.index].add(event)
    return choices


def _completion_stream(run: Run, req, envelope: Envelope, tokenizer: Tokenizer):
    """SSE chunks of a streamed completion: echo's prompt first, then one chunk per generated token."""
    logprobs, ids = req.sampling.logprobs is not None, req.return_token_ids
    first = {"prompt_token_ids": req.prompts[0] if len(req.prompts) == 1 else req.prompts} \
        if req.return_prompt_ids or ids else {}
    head = []
    if req.echo and req.sampling.prompt_logprobs is None:  # with logprobs, the prompt comes scored (PromptScores)
        head = [[{"index": i, "text": prompt_offsets(_prompt_of(run, i), tokenizer)[0], "logprobs": None,
                  "finish_reason": None} for i in range(run.total)]]

    def choices_of(event) -> list[dict]:
        if isinstance(event, PromptScores):
            text, offsets = prompt_offsets(_prompt_of(run, event.indices[0]), tokenizer)
            scores = completion_logprobs(event.logprobs, offsets, tokenizer)
            return [{"index": i, "text": text, "logprobs": scores, "finish_reason": None} for i in event.indices]
        return [completion_chunk_choice(event, logprobs, ids, tokenizer)]

    return _event_stream(run, envelope, req.include_usage, choices_of, head, first)


async def _event_stream(run: Run, envelope: Envelope, include_usage: bool, choices_of, head: list, first: dict):
    """`data: {...}` per event (the first chunk carries `first`), the usage if asked, then `data: [DONE]`.

    An error after the stream began is one `data: {"error": ...}` event (no [DONE]); a client that goes
    away ends the generator (finally), which cancels the run at the scheduler's next step.
    """
    try:
        for choices in head:
            yield sse(envelope(choices=choices, **first))
            first = {}
        async for event in run.events():
            choices = choices_of(event)
            if choices:
                yield sse(envelope(choices=choices, **first))
                first = {}
        if include_usage:
            yield sse(envelope(choices=[], usage=usage(run.prompt_tokens, run.completion_tokens)))
        yield sse("[DONE]")
    except ApiError as exc:
        yield sse(exc.body())
    finally:
        run.cancel()


def _add_chat(app: FastAPI, served: Served) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_json(request, served.limits.max_body_bytes)
        req, ids = await run_in_threadpool(parse_chat, body, served.limits, served.name, served.chat,
                                           served.tokenizer)
        run = Run([ids], [req.sampling], served.name)
        submit(served, run, request)
        envelope = Envelope("chat.completion.chunk" if req.stream else "chat.completion", served.name)
        if req.stream:
            return StreamingResponse(_chat_stream(run, req, envelope, served.tokenizer),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        choices = await unless_disconnected(request.receive, run, _gather(run, False, served.tokenizer))
        return JSONResponse(envelope(choices=[c.chat(req.logprobs) for c in choices],
                                     usage=usage(run.prompt_tokens, run.completion_tokens)))


def _chat_stream(run: Run, req, envelope: Envelope, tokenizer: Tokenizer):
    """Chat chunks: the assistant's role first, then content deltas and the finish reason."""
    head = [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for i in range(run.total)]]

    def choices_of(event) -> list[dict]:
        if isinstance(event, Delta) and (event.text or event.finish_reason or event.logprob):
            return [chat_chunk_choice(event, req.logprobs, tokenizer)]
        return []  # a token that completed no text yet (part of a character, or a possible stop string)

    return _event_stream(run, envelope, req.include_usage, choices_of, head, {})
