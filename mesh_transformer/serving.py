"""An OpenAI-compatible HTTP server over a `sampling.Generator`: POST /v1/completions (with server-sent-event
streaming), GET /v1/models, GET /health, and the original trainer's POST /complete.

Requests are validated (bad input is a 4xx with a message, never a 5xx), queued in a bounded queue (503 with
Retry-After when full), and batched by one background thread into shared generation calls; a request whose
client has gone is dropped from its batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh_transformer.engine import Generator
from mesh_transformer.sampling import Completion, Row, SamplingError, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_ROWS_PER_REQUEST = 64  # prompts x n
DISCONNECT_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    model_name: str = "gptj"
    max_batch: int = 16  # rows generated together
    # A batch closes once no request arrived for batch_wait_s, or max_batch_wait_s after its first request:
    # small next to a generation call, long enough for the clients of the last batch to come back.
    batch_wait_s: float = 0.02
    max_batch_wait_s: float = 0.2
    max_queue: int = 64  # requests waiting for a batch; more are refused with 503
    api_key: str | None = None  # when set, every /v1 and /complete request needs "Authorization: Bearer KEY"
    complete_max_tokens: int = 256  # what the original /complete route always generated


# ----- request bodies -----

NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (OpenAI's fields; logprobs, echo and suffix are not supported)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: NonNegativeFloat | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = 1.0
    top_k: int | None = Field(default=0, ge=0)  # not in OpenAI's API; 0 = no limit
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_ROWS_PER_REQUEST)
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    user: str | None = None


class CompleteRequest(BaseModel):
    """The body of the original POST /complete."""

    model_config = ConfigDict(strict=True, extra="ignore")

    context: str
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.9
    temp: NonNegativeFloat = 1.0
    max_tokens: int | None = Field(default=None, ge=1)


class BadRequest(Exception):
    """Answered as an OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers = {"Retry-After": "1"} if status == 503 else None


def _error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----- the batcher -----


class _Job:
    """One HTTP request's rows, and the way back to its handler (an asyncio queue on the server's loop)."""

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop, streaming: bool):
        self.rows, self.loop, self.streaming = rows, loop, streaming
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    pass


class Batcher:
    """Collects jobs into batches of at most `max_batch` rows and runs each batch in one generate call."""

    def __init__(self, generator: Generator, options: ServerOptions):
        self.generator, self.options = generator, options
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches = 0  # generate calls so far (for /health and tests)
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._wake:
            if len(self._jobs) >= self.options.max_queue:
                raise QueueFull()
            self._jobs.append(job)
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[_Job] | None:
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            # Wait while requests keep arriving (the clients of a finished batch come back at about the same
            # time), but never long: a lone request waits max_batch_wait_s at most.
            started = quiet_since = time.monotonic()
            seen = len(self._jobs)
            while sum(len(j.rows) for j in self._jobs) < self.options.max_batch:
                now = time.monotonic()
                if len(self._jobs) != seen:
                    seen, quiet_since = len(self._jobs), now
                deadline = min(
                    quiet_since + self.options.batch_wait_s, started + self.options.max_batch_wait_s
                )
                if now >= deadline:
                    break
                self._wake.wait(deadline - now)
            batch, rows = [], 0
            while self._jobs and (not batch or rows + len(self._jobs[0].rows) <= self.options.max_batch):
                job = self._jobs.popleft()
                if not job.cancelled:
                    batch.append(job)
                    rows += len(job.rows)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._generate(batch)

    def _generate(self, batch: list[_Job]) -> None:
        rows, owner = [], []  # owner[i] = (job, its row index) of batch row i
        for job in batch:
            for k, row in enumerate(job.rows):
                rows.append(row)
                owner.append((job, k))
        try:
            results = self.generator.generate(
                rows,
                on_text=lambda i, delta: (
                    owner[i][0].streaming and owner[i][0].send("text", owner[i][1], delta)
                ),
                cancelled=lambda i: owner[i][0].cancelled,
            )
        except Exception as e:  # a bug, not the request: answer every waiting client rather than hang them
            for job in batch:
                job.send("error", f"generation failed: {type(e).__name__}: {e}")
            return
        finally:
            self.batches += 1
        start = 0
        for job in batch:
            job.send("done", results[start : start + len(job.rows)])
            start += len(job.rows)


# ----- the app -----


@dataclasses.dataclass
class _Prepared:
    rows: list[Row]
    prompt_tokens: list[int]  # per row


def build_app(generator: Generator, options: ServerOptions = ServerOptions()) -> FastAPI:
    """The FastAPI app serving `generator` (its tokenizer encodes prompts and decodes completions)."""
    if generator.tokenizer is None:
        raise ValueError("serving needs a generator with a tokenizer")
    batcher = Batcher(generator, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="mesh-transformer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.batcher = batcher
    tokenizer, created = generator.tokenizer, int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(400, "invalid request: " + "; ".join(problems), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    # A dependency rather than an HTTP middleware: Starlette's middleware wrapper hides client disconnects.
    async def authorize(request: Request) -> None:
        if options.api_key:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), options.api_key.encode()):
                raise BadRequest(
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    status=401,
                    kind="authentication_error",
                )

    protected = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": batcher.queued, "batches": batcher.batches}

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict:
        card = {
            "id": options.model_name,
            "object": "model",
            "created": created,
            "owned_by": "mesh-transformer",
        }
        return {"object": "list", "data": [card]}

    def encode(text: str, param: str) -> list[int]:
        try:
            return tokenizer.encode(text).ids
        except Exception:  # e.g. lone UTF-16 surrogates that JSON allows but UTF-8 cannot encode
            raise BadRequest(f"{param} is not encodable text", param) from None

    def prepare(body: CompletionRequest) -> _Prepared:
        if body.logprobs is not None or body.echo or body.suffix:
            raise BadRequest("logprobs, echo and suffix are not supported by this server")
        if body.model is not None and body.model != options.model_name:
            raise BadRequest(f"model {body.model!r} is not served here; use {options.model_name!r}", "model")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise BadRequest("prompt is empty: give a string, a list of strings or token ids", "prompt")
        n = body.n or 1
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise BadRequest(f"prompts x n is {len(prompts) * n}; at most {MAX_ROWS_PER_REQUEST}", "n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
            raise BadRequest(f"stop must be at most {MAX_STOP_SEQUENCES} non-empty strings", "stop")
        for s in stop:
            encode(s, "stop")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        settings = SamplingParams(
            max_tokens=16 if body.max_tokens is None else body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=tuple(stop),
            seed=seed,
        )
        rows, counts = [], []
        for prompt in prompts:
            if isinstance(prompt, str):
                if (
                    len(prompt) > 64 * generator.seq
                ):  # longer than any prompt that could fit; spare the tokenizer
                    raise BadRequest(
                        f"prompt is too long for the model's context of {generator.seq} tokens", "prompt"
                    )
                prompt = encode(prompt, "prompt")
            for choice in range(n):
                row = Row(list(prompt), settings, choice=choice)
                try:
                    generator.check(row)
                except SamplingError as e:
                    raise BadRequest(str(e), "prompt" if "prompt" in str(e) else None) from None
                rows.append(row)
                counts.append(len(prompt))
        return _Prepared(rows, counts)

    def enqueue(rows: list[Row], streaming: bool = False) -> _Job:
        job = _Job(rows, asyncio.get_running_loop(), streaming)
        try:
            batcher.submit(job)
        except QueueFull:
            raise BadRequest("the server is busy; retry shortly", status=503, kind="server_busy") from None
        return job

    async def wait_done(job: _Job, request: Request) -> list[Completion] | None:
        """The job's completions; None (and the job cancelled) if the client disconnects first."""
        getter = asyncio.ensure_future(job.events.get())  # one get, kept across polls: no event is lost
        while True:
            finished, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not finished:
                if await request.is_disconnected():
                    getter.cancel()
                    job.cancelled = True
                    return None
                continue
            kind, *payload = getter.result()
            if kind == "done":
                return payload[0]
            if kind == "error":
                raise RuntimeError(payload[0])
            getter = asyncio.ensure_future(job.events.get())

    def usage(prepared: _Prepared, results: list[Completion]) -> dict:
        prompt_tokens = sum(prepared.prompt_tokens)
        completion_tokens = sum(c.generated_tokens for c in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.post("/v1/completions", dependencies=protected)
    async def completions(body: CompletionRequest, request: Request):
        prepared = prepare(body)
        job = enqueue(prepared.rows, streaming=bool(body.stream))
        response_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": response_id, "object": "text_completion", "created": now, "model": options.model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(job, head, prepared, usage if include_usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results = await wait_done(job, request)
        if results is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(results)
        ]
        return {**head, "choices": choices, "usage": usage(prepared, results)}

    @app.post("/complete", dependencies=protected)
    async def complete(body: CompleteRequest, request: Request):
        ids = encode(body.context, "context") if body.context else []
        room = generator.seq - len(ids)
        if not ids or room < 1:
            raise BadRequest(f"context must be 1 to {generator.seq - 1} tokens, got {len(ids)}", "context")
        wanted = body.max_tokens or options.complete_max_tokens
        settings = SamplingParams(
            max_tokens=min(wanted, room), temperature=body.temp, top_p=body.top_p, seed=secrets.randbits(63)
        )
        results = await wait_done(enqueue([Row(ids, settings)]), request)
        if results is None:
            return JSONResponse({}, status_code=499)
        return {"completion": results[0].text}

    return app


async def _stream(job: _Job, head: dict, prepared: _Prepared, usage) -> AsyncIterator[str]:
    """Server-sent events: text deltas as they are generated, each choice's finish_reason, then [DONE]."""

    def event(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    try:
        while True:
            kind, *payload = await job.events.get()
            if kind == "text":
                index, delta = payload
                yield event([{"text": delta, "index": index, "logprobs": None, "finish_reason": None}])
            elif kind == "done":
                results: list[Completion] = payload[0]
                yield event(
                    [
                        {"text": "", "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(results)
                    ]
                )
                if usage is not None:
                    yield event([], usage=usage(prepared, results))
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps({'error': {'message': payload[0], 'type': 'server_error'}})}\n\n"
                return
    finally:
        job.cancelled = True  # normal end, or the client went away mid-stream: either way stop generating


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
