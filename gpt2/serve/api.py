"""The HTTP API, as OpenAI's (and vLLM's for tokenizing): `POST /v1/completions` and `POST /v1/chat/completions`
(streamed as server-sent events when asked), `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`,
`GET /v1/models`, `GET /health`, and the playground page at `GET /`.

Completions follow OpenAI's legacy semantics, which scoring tools (lm-evaluation-harness) rely on: prompts as text
or token ids, `logprobs` (the top 0-5 alternatives of each token) with `echo` (the prompt's tokens scored too, the
first one null), `max_tokens=0` with `echo` to score without generating. A prompt plus max_tokens over the model's
context is a 400 unless the request sets the `truncate` extension (the prompt keeps its tail and the context
window slides). Chat completions render the messages with the model's chat template (`gpt2.chat`) and stop at
end-of-text. Log-probabilities are the model's own, before temperature, top-k/p and penalties.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (naming the
field), 404 for another model, 413 for a body over MAX_BODY_BYTES, 503 with Retry-After when the queue is full.
`create_app` builds the FastAPI app around a running `Scheduler`; the request bodies are `gpt2.serve.requests`',
the response objects `gpt2.serve.replies`'.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2.errors import UserError
from gpt2.resources import PLAYGROUND_HTML
from gpt2.sampling import Sampler, TextStream, window_size
from gpt2.serve.replies import ChatReply, CompletionReply, Reply
from gpt2.serve.requests import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    RequestError,
    TokenizeRequest,
)
from gpt2.serve.scheduler import Event, Job, QueueFull, Row, Scheduler

DISCONNECT_POLL_S = 0.5  # how often a request checks that its client is still there
MAX_BODY_BYTES = 8 << 20  # a request body past this is refused (413)


def create_app(scheduler: Scheduler, model_name: str, max_tokens: int | None) -> FastAPI:
    """The app around a started `scheduler`; stopping the app (uvicorn's shutdown) stops the scheduler.
    `max_tokens` caps what a request may ask for (None: only the context does)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="gpt2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit)
    created = int(time.time())
    sampler = scheduler.sampler
    block_size = sampler.model.config.block_size

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        invalid_json = exc.errors()[0]["type"] == "json_invalid"
        return error(400, _validation_message(exc), param=None if invalid_json else _validation_param(exc))

    @app.exception_handler(RequestError)
    async def cannot_serve(request: Request, exc: RequestError) -> JSONResponse:
        kind = "model_not_found" if exc.status == 404 else "invalid_request_error"
        return error(exc.status, str(exc), param=exc.param, code=exc.code, kind=kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **scheduler.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "gpt2"}
        return {"object": "list", "data": [{**model, "max_model_len": block_size}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return PLAYGROUND_HTML.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(model_name))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        eot = sampler.tokenizer.eot_id
        eos = None if eot is None else sampler.tokenizer.decode([eot])
        return {
            "tokenizer_class": f"{sampler.tokenizer.name} ({type(sampler.tokenizer).__name__})",
            "eos_token": eos,
            "eos_token_id": eot,
            "bos_token": eos,
            "bos_token_id": eot,
            "pad_token": None,
            "model_max_length": block_size,
            "vocab_size": sampler.tokenizer.vocab_size,
            "chat_template": sampler.chat_template,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, model_name)
        if body.messages is not None:
            ids = _chat_ids(sampler, body.messages)
        else:
            ids = sampler.tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": block_size}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, model_name)
        return {"prompt": sampler.tokenizer.decode(_checked_ids(sampler, body.tokens, "tokens"))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(body.model, model_name)
        count = 16 if body.max_tokens is None else body.max_tokens  # (OpenAI's default, also for null)
        if count == 0 and not body.echo:
            raise RequestError("max_tokens=0 scores the prompt without generating, which needs echo=true", "max_tokens")
        _check_max_tokens(count, max_tokens)
        prompts, echoes = [], []
        for i, prompt in enumerate(body.prompts):
            where = "prompt" if len(body.prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids = sampler.tokenizer.encode(prompt) if prompt else _empty_prompt(sampler)
            else:
                ids = _checked_ids(sampler, prompt, where)
            fitted = _fit(ids, count, body.truncate, block_size, where)
            prompts.append(fitted)
            echoes.append(prompt if isinstance(prompt, str) and fitted is ids else sampler.tokenizer.decode(fitted))
        reply = CompletionReply(body, model_name, sampler.tokenizer, prompts, echoes)
        job = _job(scheduler, body, prompts, count, body.logprobs, body.echo and body.logprobs is not None)
        return await _respond(scheduler, job, reply, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        _check_model(body.model, model_name)
        ids = _chat_ids(sampler, body.messages)
        asked = body.max_completion_tokens or body.max_tokens
        _check_max_tokens(asked, max_tokens)
        count = asked or _room(len(ids), block_size, max_tokens)
        ids = _fit(ids, count, body.truncate, block_size, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reply = ChatReply(body, model_name, sampler.tokenizer, [ids])
        job = _job(scheduler, body, [ids], count, logprobs, False)
        return await _respond(scheduler, job, reply, body, request)

    return app


def error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES is refused with 413, whether it declares its length
    (refused before it is read) or comes in chunks (refused once the bytes read pass the limit)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body must be at most {MAX_BODY_BYTES >> 20} MiB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await error(413, message)(scope, receive, send)
        read = 0

        async def limited_receive() -> dict:
            nonlocal read
            event = await receive()
            if event["type"] == "http.request":
                read += len(event.get("body", b""))
                if read > MAX_BODY_BYTES:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


def _validation_param(exc: RequestValidationError) -> str | None:
    loc = [str(part) for part in exc.errors()[0]["loc"] if part != "body"]
    return ".".join(loc) or None


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return "the request body is not valid JSON"
    param = _validation_param(exc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field; see the OpenAI API reference for the fields"
    if first["type"] == "literal_error" and param in ("best_of", "suffix"):
        message = "not supported by this server (leave it out)"
    return f"{param}: {message}" if param else message


def _check_model(asked: str | None, model_name: str) -> None:
    if asked not in (None, model_name):
        message = f"the model {asked!r} does not exist; this server serves {model_name!r}"
        raise RequestError(message, "model", status=404)


def _check_max_tokens(asked: int | None, cap: int | None) -> None:
    if asked is not None and cap is not None and asked > cap:
        raise RequestError(f"max_tokens must be <= {cap} (this server's max_tokens), got {asked}", "max_tokens")


def _checked_ids(sampler: Sampler, ids: list[int], where: str) -> list[int]:
    vocab = sampler.tokenizer.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise RequestError(f"{where}: token id {bad} is not in the vocabulary [0, {vocab})", where)
    return ids


def _empty_prompt(sampler: Sampler) -> list[int]:
    """An empty prompt starts from end-of-text (gpt2) or a newline (char), as sample.py does."""
    return sampler.encode_prompt("", 1)


def _chat_ids(sampler: Sampler, messages: list[ChatMessage]) -> list[int]:
    try:
        return sampler.encode_chat([m.plain() for m in messages])
    except UserError as e:
        raise RequestError(str(e), "messages") from None


def _room(prompt_tokens: int, block_size: int, cap: int | None) -> int:
    """A chat reply's max_tokens when the request gives none: what the context has room for (half the context
    when the prompt fills it: only a truncating request gets that far), within the server's cap."""
    room = block_size - prompt_tokens if prompt_tokens < block_size else window_size(block_size)
    return room if cap is None else min(room, cap)


def _fit(ids: list[int], max_tokens: int, truncate: bool, block_size: int, where: str) -> list[int]:
    """The prompt's ids if they and max_tokens fit the context; with `truncate`, its tail that leaves room for
    max(max_tokens, block_size // 2) tokens before the window slides; otherwise a 400 in OpenAI's words."""
    if len(ids) + max_tokens <= block_size:
        return ids
    if truncate:
        return ids[-max(block_size - max_tokens, window_size(block_size)) :]
    raise RequestError(
        f"This model's maximum context length is {block_size} tokens, however you requested "
        f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the completion). Please "
        "reduce your prompt; or completion length (or set truncate=true to keep the prompt's tail and slide).",
        where.split("[")[0],
        "context_length_exceeded",
    )


def _job(
    scheduler: Scheduler,
    body: GenerationRequest,
    prompts: list[list[int]],
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: bool,
) -> Job:
    """The rows of a request, n per prompt (choice index = prompt * n + sample)."""
    sampler = scheduler.sampler
    params = body.params()
    job = Job(asyncio.get_running_loop())
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            generator = sampler.new_generator(None if body.seed is None else (body.seed + index) % 2**64)
            stream = TextStream(sampler.tokenizer, body.stops)
            job.rows.append(
                Row(job, index, ids, params, generator, stream, max_tokens, logprobs, prompt_logprobs=prompt_logprobs)
            )
    return job


async def _respond(scheduler: Scheduler, job: Job, reply: "Reply", body: GenerationRequest, request: Request) -> Any:
    if len(job.rows) > scheduler.max_waiting:
        raise RequestError(
            f"{reply.choices // body.n} prompts x n={body.n} is {len(job.rows)} sequences, more than this server "
            f"queues (max_waiting={scheduler.max_waiting}); split the request",
            "n",
        )
    try:
        scheduler.submit(job)
    except QueueFull as e:
        return error(503, f"server busy: {e}; retry later", kind="server_busy", headers={"Retry-After": "1"})
    if body.stream:
        return StreamingResponse(_sse(job, reply, request), media_type="text/event-stream")
    return await _complete(job, reply, request)


async def _events(job: Job, reply: Reply, request: Request) -> AsyncIterator[Event]:
    """The job's events until every choice has finished, or until the client goes away (checked every
    DISCONNECT_POLL_S, events or not). Raises RuntimeError on an error event. A job left unfinished, for any
    reason (the client went away, the response was cancelled), is cancelled: its rows are freed."""
    finished = 0
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while finished < reply.choices:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)  # cancelling a get loses nothing
            except asyncio.TimeoutError:
                event = None
            if loop.time() - checked >= DISCONNECT_POLL_S:
                checked = loop.time()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            if event.error:
                raise RuntimeError(event.error)
            finished += event.finish_reason is not None
            yield event
    finally:
        job.cancelled = finished < reply.choices


def _completion_tokens(job: Job) -> int:
    return sum(row.generated for row in job.rows)


async def _complete(job: Job, reply: Reply, request: Request) -> JSONResponse | dict[str, Any]:
    events: list[list[Event]] = [[] for _ in range(reply.choices)]
    try:
        async for event in _events(job, reply, request):
            events[event.index].append(event)
    except RuntimeError as e:
        return error(500, str(e), kind="server_error")
    if job.cancelled:
        return error(499, "the client closed the request")
    choices = [reply.final_choice(i, choice_events) for i, choice_events in enumerate(events)]
    return reply.envelope(choices, reply.usage(_completion_tokens(job)))


async def _sse(job: Job, reply: Reply, request: Request) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams: chunks as text comes, each choice's finish_reason, a usage chunk if
    asked (stream_options.include_usage), then `data: [DONE]`."""

    def chunk(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    for opening in reply.opening_chunks():
        yield chunk(opening)
    events = _events(job, reply, request)
    try:
        async for event in events:
            yield chunk(reply.envelope([reply.chunk_choice(event)], chunk=True))
    except RuntimeError as e:
        yield chunk({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        await events.aclose()  # the client went away mid-stream: cancel the job now, freeing its rows
    options = reply.body.stream_options
    if options is not None and options.include_usage:
        yield chunk(reply.envelope([], reply.usage(_completion_tokens(job)), chunk=True))
    yield "data: [DONE]\n\n"
