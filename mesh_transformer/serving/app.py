"""The FastAPI app: its routes, the bearer-key check, the request body limit (413), OpenAI-style errors (a
4xx naming the problem for anything a client sends wrong; a 500 only when generation itself fails), and
/openapi.json with the request schemas that validation enforces.

A request is validated, turned into rows on a worker thread (tokenizing never blocks the event loop),
queued for the engine (503 with Retry-After when the queue is full or the engine has stopped), and
answered as one JSON body or as server-sent events; a client that disconnects has its rows cancelled.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh_transformer.engine import Generator
from mesh_transformer.sampling import Completion
from mesh_transformer.serving.chat import ChatTemplate
from mesh_transformer.serving.inputs import Prepared, Preparer
from mesh_transformer.serving.responses import ChatFormat, CompletionFormat, TokenText
from mesh_transformer.serving.schemas import ApiError, ErrorResponse, Limits, error_body, request_schemas
from mesh_transformer.serving.worker import EngineStopped, Job, QueueFull, Worker

DISCONNECT_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    model_name: str = "gptj"
    max_batch: int = 16  # slots the engine decodes together
    max_queue: int = 64  # requests waiting for a slot; more are refused with 503
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer KEY"
    complete_max_tokens: int = 256  # what the original /complete route always generated
    max_body_bytes: int = 4 << 20  # larger request bodies are refused with 413 before they are read
    chat_template: ChatTemplate | None = None  # /v1/chat/completions answers 400 without one
    warm_up: bool = False  # compile every engine program before serving, so that no request waits for one


class _Disconnected(Exception):
    pass


class _BodyLimit:
    """413, in the API's error format, for a request body over `max_bytes`: at once when its Content-Length
    says so, else as soon as that much has arrived."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            message = f"the request body is {int(length)} bytes; at most {self.max_bytes}"
            return await JSONResponse(error_body(message, "invalid_request_error"), 413)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI answers this with the app's HTTP error handler
                raise StarletteHTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)


class Service:
    """What the routes do: prepare rows, hand them to the worker, and answer."""

    def __init__(self, generator: Generator, worker: Worker, options: ServerOptions):
        self.worker, self.options = worker, options
        self.preparer = Preparer(generator, options.chat_template, options.complete_max_tokens)
        self.tokens = TokenText(generator.tokenizer)

    async def answer(self, prepare: Callable[[], Prepared], format_class: type, request: Request):
        """The OpenAI-shaped answer to a request: one JSON body, or a stream of server-sent events."""
        prepared = await asyncio.to_thread(prepare)
        form = format_class(self.tokens, prepared, self.options.model_name)
        job = self.submit(prepared)
        if prepared.stream:
            first = await self.next_event(
                job, request
            )  # a request that fails at once gets a 500, not a stream
            return StreamingResponse(
                _events(job, form, first, prepared.include_usage, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        completions = await self.wait(job, request)
        return JSONResponse(await asyncio.to_thread(form.body, completions))

    async def complete(self, prepare: Callable[[], Prepared], request: Request) -> dict:
        prepared = await asyncio.to_thread(prepare)
        return {"completion": (await self.wait(self.submit(prepared), request))[0].text}

    def submit(self, prepared: Prepared) -> Job:
        job = Job(prepared.rows, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError("the server is busy; retry shortly", status=503, kind="server_busy") from None
        except EngineStopped as e:
            raise ApiError(str(e), status=503, kind="server_error") from None
        return job

    async def next_event(self, job: Job, request: Request) -> tuple:
        """The job's next event; cancels it and raises _Disconnected if the client goes first."""
        getter = asyncio.ensure_future(job.events.get())
        while True:
            finished, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if finished:
                event = getter.result()
                if event[0] == "error":
                    raise ApiError(event[1], status=500, kind="server_error")
                return event
            if await request.is_disconnected():
                getter.cancel()
                job.cancelled = True
                raise _Disconnected()

    async def wait(self, job: Job, request: Request) -> list[Completion]:
        completions: list[Completion | None] = [None] * len(job.rows)
        while any(c is None for c in completions):
            kind, *payload = await self.next_event(job, request)
            if kind == "done":
                completions[payload[0]] = payload[1]
        return completions  # type: ignore[return-value]


async def _events(job: Job, form, first: tuple, include_usage: bool, request: Request) -> AsyncIterator[str]:
    """Server-sent events: the choices' text as it grows, each choice's last chunk, usage, then [DONE]."""
    sse = lambda body: f"data: {json.dumps(body)}\n\n"  # noqa: E731
    completions: list[Completion | None] = [None] * len(job.rows)
    try:
        for chunk in form.start_chunks():
            yield sse(chunk)
        event = first
        while True:
            kind, *payload = event
            if kind == "text":
                yield sse(form.text_chunk(*payload))
            elif kind == "done":
                completions[payload[0]] = payload[1]
                yield sse(form.done_chunk(*payload))
                if all(c is not None for c in completions):
                    break
            event = await job.events.get()
            if event[0] == "error":
                yield sse(error_body(event[1], "server_error"))
                return
        if include_usage:
            yield sse(form.usage_chunk(completions))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # normal end, or the client went away mid-stream: either way stop generating


def build_app(generator: Generator, options: ServerOptions = ServerOptions()) -> FastAPI:
    """The FastAPI app serving `generator` (its tokenizer encodes prompts and decodes completions)."""
    if generator.tokenizer is None:
        raise ValueError("serving needs a generator with a tokenizer")
    engine = generator.engine(options.max_batch)
    if options.warm_up:
        engine.warm_up()
    worker = Worker(engine, options.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(
        title="mesh-transformer",
        summary="An OpenAI-compatible completions server",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.add_middleware(_BodyLimit, max_bytes=options.max_body_bytes)
    _add_error_handlers(app)
    _add_routes(
        app,
        Service(generator, worker, options),
        Limits(options.model_name, generator.seq, generator.vocab_size),
    )
    app.openapi = lambda: _openapi(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse(
            error_body("invalid request: " + "; ".join(problems), "invalid_request_error"), 400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(_Disconnected)
    async def disconnected(request: Request, exc: _Disconnected) -> JSONResponse:
        return JSONResponse({}, status_code=499)  # nobody is listening


ERRORS = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "invalid request (the message names the field)"),
        (401, "missing or wrong API key"),
        (413, "request body too large"),
        (500, "generation failed"),
        (503, "queue full (retry after Retry-After) or engine stopped"),
    ]
}
STREAM = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}
}


def _add_routes(app: FastAPI, service: Service, limits: Limits) -> None:
    schemas = request_schemas(limits)
    CompletionRequest, ChatRequest, CompleteRequest = schemas.completion, schemas.chat, schemas.complete
    protected = [Depends(_authorization(service.options.api_key))]
    created = int(time.time())

    @app.get("/health", responses={503: ERRORS[503]})
    async def health() -> JSONResponse:
        worker = service.worker
        if not worker.alive:
            return JSONResponse({"status": "stopped", "error": worker.error}, status_code=503)
        return JSONResponse(
            {"status": "ok", "queued": worker.queued, "device_calls": worker.engine.device_calls}
        )

    @app.get("/v1/models", dependencies=protected, responses={401: ERRORS[401]})
    async def models() -> dict:
        card = {
            "id": limits.model_name,
            "object": "model",
            "created": created,
            "owned_by": "mesh-transformer",
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=protected, responses={**ERRORS, **STREAM})
    async def completions(body: CompletionRequest, request: Request):
        return await service.answer(lambda: service.preparer.completion(body), CompletionFormat, request)

    @app.post("/v1/chat/completions", dependencies=protected, responses={**ERRORS, **STREAM})
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.answer(lambda: service.preparer.chat(body), ChatFormat, request)

    @app.post("/complete", dependencies=protected, responses=ERRORS)
    async def complete(body: CompleteRequest, request: Request) -> dict:
        return await service.complete(lambda: service.preparer.complete(body), request)


def _authorization(api_key: str | None) -> Callable:
    # A dependency rather than an HTTP middleware: Starlette's middleware wrapper hides client disconnects.
    async def authorize(request: Request) -> None:
        if api_key:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise ApiError(
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    status=401,
                    kind="authentication_error",
                )

    return authorize


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with its 422 answers removed: validation errors are answered 400 here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
