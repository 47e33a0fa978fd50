"""The HTTP API, as OpenAI's: `POST /v1/completions` (streamed as server-sent events when asked), `GET /v1/models`,
`GET /health`, and the playground page at `GET /`. Errors are OpenAI's shape, {"error": {"message", "type",
"param", "code"}}: 400 for a bad request (naming the field), 404 for another model, 503 with Retry-After when
the queue is full. `create_app` builds the FastAPI app around a running `Scheduler`."""

from __future__ import annotations

import asyncio
import html
import json
import secrets
import time
import warnings
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gpt2.config import sampling_range_error
from gpt2.errors import UserError
from gpt2.resources import PLAYGROUND_HTML
from gpt2.sampling import SamplingParams, TextStream
from gpt2.serve.scheduler import Event, Job, QueueFull, Row, Scheduler, log

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
MAX_BODY_BYTES = 8 << 20  # a request body past this is refused (413) before it is read


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, plus top_k. Fields OpenAI has and this server does
    not implement are accepted only at their neutral value, so that a client's defaults pass."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, le=2.0)  # (OpenAI's cap; our ranges: `_in_range`)
    top_p: float | None = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    logprobs: Literal[None] = None
    best_of: Literal[None, 1] = None
    suffix: Literal[None] = None
    frequency_penalty: Literal[None, 0] = None
    presence_penalty: Literal[None, 0] = None
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        return prompt

    @field_validator("temperature", "top_p", "top_k")
    @classmethod
    def _in_range(cls, value: float | int | None, info: ValidationInfo) -> float | int | None:
        problem = None if value is None else sampling_range_error(info.field_name, value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops

    @model_validator(mode="after")
    def _no_logit_bias(self) -> "CompletionRequest":
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


def create_app(scheduler: Scheduler, model_name: str, max_tokens: int) -> FastAPI:
    """The app around a started `scheduler`; stopping the app (uvicorn's shutdown) stops the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="gpt2", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return error(413, f"the request body must be at most {MAX_BODY_BYTES >> 20} MiB")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        invalid_json = exc.errors()[0]["type"] == "json_invalid"
        return error(400, _validation_message(exc), param=None if invalid_json else _validation_param(exc))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **scheduler.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gpt2"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return PLAYGROUND_HTML.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(model_name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.model not in (None, model_name):
            return error(
                404,
                f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                kind="model_not_found",
            )
        if body.max_tokens is not None and body.max_tokens > max_tokens:
            return error(
                400,
                f"max_tokens must be <= {max_tokens} (this server's max_tokens), got {body.max_tokens}",
                param="max_tokens",
            )
        sequences = len(body.prompts) * body.n
        if sequences > scheduler.max_waiting:
            return error(
                400,
                f"{len(body.prompts)} prompts x n={body.n} is {sequences} sequences, more than this "
                f"server queues (max_waiting={scheduler.max_waiting}); split the request",
                param="n",
            )
        try:
            job, prompt_tokens = _job(scheduler, body)
        except UserError as e:
            return error(400, str(e), param="prompt")
        try:
            scheduler.submit(job)
        except QueueFull as e:
            return error(503, f"server busy: {e}; retry later", kind="server_busy", headers={"Retry-After": "1"})
        reply = _Reply(body, model_name, prompt_tokens)
        if body.stream:
            return StreamingResponse(_sse(job, reply, request), media_type="text/event-stream")
        return await _complete(job, reply, request)

    return app


def error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


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
        message = "unknown field; see the OpenAI completions API for the fields"
    if first["type"] == "literal_error":
        message = "not supported by this server (leave it out)"
    return f"{param}: {message}" if param else message


def _job(scheduler: Scheduler, body: CompletionRequest) -> tuple[Job, list[int]]:
    """The rows of a request, n per prompt (choice index = prompt * n + sample), and its prompts' token counts."""
    sampler = scheduler.sampler
    max_tokens = body.max_tokens or 16
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
    )  # OpenAI's defaults for null
    job = Job(asyncio.get_running_loop())
    prompt_tokens = []
    for p, prompt in enumerate(body.prompts):
        with warnings.catch_warnings(record=True) as caught:  # a prompt longer than the context keeps its tail
            warnings.simplefilter("always")
            ids = sampler.encode_prompt(prompt, max_tokens)
        for warning in caught:
            log.warning("%s", warning.message)
        prompt_tokens.append(len(ids))
        for i in range(body.n):
            index = p * body.n + i
            generator = sampler.new_generator(None if body.seed is None else body.seed + index)
            job.rows.append(
                Row(job, index, ids, params, generator, TextStream(sampler.tokenizer, body.stop), max_tokens)
            )
    return job, prompt_tokens


class _Reply:
    """The response's fixed parts (id, model, created) and its usage count."""

    def __init__(self, body: CompletionRequest, model: str, prompt_tokens: list[int]) -> None:
        self.body, self.model = body, model
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.prompt_tokens = sum(prompt_tokens) * body.n
        self.choices = len(prompt_tokens) * body.n

    def prompt_of(self, index: int) -> str:
        return self.body.prompts[index // self.body.n]

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        reply = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            reply["usage"] = usage
        return reply

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def _events(job: Job, reply: _Reply, request: Request) -> AsyncIterator[Event]:
    """The job's events until every choice has finished, or until the client goes away (checked every
    DISCONNECT_POLL_S while no event comes). Raises RuntimeError on an error event. A job left unfinished, for
    any reason (the client went away, the response was cancelled), is cancelled: its rows are freed."""
    finished = 0
    try:
        while finished < reply.choices:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)  # cancelling a get loses nothing
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.error:
                raise RuntimeError(event.error)
            finished += event.finish_reason is not None
            yield event
    finally:
        job.cancelled = finished < reply.choices


def _completion_tokens(job: Job) -> int:
    return sum(row.generated for row in job.rows)


async def _complete(job: Job, reply: _Reply, request: Request) -> JSONResponse | dict[str, Any]:
    texts = [reply.prompt_of(i) if reply.body.echo else "" for i in range(reply.choices)]
    reasons: list[str | None] = [None] * reply.choices
    try:
        async for event in _events(job, reply, request):
            texts[event.index] += event.text
            reasons[event.index] = event.finish_reason or reasons[event.index]
    except RuntimeError as e:
        return error(500, str(e), kind="server_error")
    if job.cancelled:
        return error(499, "the client closed the request")
    choices = [_choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, reasons))]
    return reply.envelope(choices, reply.usage(_completion_tokens(job)))


async def _sse(job: Job, reply: _Reply, request: Request) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams completions: one chunk per text piece, a chunk with each choice's
    finish_reason, a usage chunk if asked (stream_options.include_usage), then `data: [DONE]`."""

    def chunk(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if reply.body.echo:
        for i in range(reply.choices):
            yield chunk(reply.envelope([_choice(i, reply.prompt_of(i), None)]))
    events = _events(job, reply, request)
    try:
        async for event in events:
            yield chunk(reply.envelope([_choice(event.index, event.text, event.finish_reason)]))
    except RuntimeError as e:
        yield chunk({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        await events.aclose()  # the client went away mid-stream: cancel the job now, freeing its rows
    options = reply.body.stream_options
    if options is not None and options.include_usage:
        yield chunk(reply.envelope([], reply.usage(_completion_tokens(job))))
    yield "data: [DONE]\n\n"
