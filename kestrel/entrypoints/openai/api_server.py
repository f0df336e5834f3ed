"""The OpenAI-compatible HTTP server: FastAPI app, routes, guards, and how to run it.

Owns: the app factory (`build_app`), the API-key and body-size guard, the
error handlers that keep every failure in the OpenAI error shape, `/health`, `/metrics`,
`/v1/models`, `/tokenize`, `/detokenize`, and running uvicorn (blocking, or in a thread).
Must not hold request logic: the serving_* modules do.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kestrel
from kestrel.config import EngineConfig
from kestrel.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from kestrel.engine.tokenizer import load_tokenizer
from kestrel.entrypoints.openai.errors import (
    APIError,
    from_exception,
    http_error,
    validation_error,
)
from kestrel.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from kestrel.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kestrel.entrypoints.openai.server_config import ServerConfig
from kestrel.entrypoints.openai.serving_base import ClientDisconnected
from kestrel.entrypoints.openai.serving_chat import ServingChat
from kestrel.entrypoints.openai.serving_completion import ServingCompletion

logger = logging.getLogger("kestrel")


def error_response(error: APIError) -> Response:
    # ensure_ascii keeps any odd character a client sent valid in the error body.
    return Response(json.dumps(error.body()), status_code=error.status,
                    media_type="application/json",
                    headers={"WWW-Authenticate": "Bearer"} if error.status == 401 else None)


class GuardMiddleware:
    """API key (every route but /health) and request body size, before any parsing. The body
    is read here, at most `max_body` bytes of it, and replayed to the app."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await error_response(APIError(
                    401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key"))(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(APIError(400, "invalid Content-Length header"))(
                    scope, receive, send)
            if int(declared) > self.max_body:
                return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than max_request_body_bytes="
                              f"{self.max_body}", code="request_too_large")
        await error_response(error)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel: http.disconnect

    return replay


def build_app(engine: AsyncEngine, tokenizer: Any, served_model_names: list[str],
              server: ServerConfig, metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI app over a running AsyncEngine (the app never owns the engine's lifetime)."""
    app = FastAPI(title="kestrel", version=kestrel.__version__,
                  description="OpenAI-compatible API served by kestrel",
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                             503: {"model": ErrorResponse}})
    completion = ServingCompletion(engine, tokenizer, served_model_names)
    chat = ServingChat(engine, tokenizer, served_model_names,
                       server.allow_special_tokens_in_messages)
    app.state.engine = engine
    app.state.metrics = metrics
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            raise APIError(503, f"the engine is not running: {engine.dead_error}",
                           code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        if metrics is None:
            raise APIError(404, "metrics are disabled")
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kestrel.__version__}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        root = engine.config.model.model
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=engine.max_model_len)
                               for name in served_model_names])

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await completion.create(request, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(request, raw)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completion.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise ValueError("prompt or messages is required (exactly one of them)")
        if request.messages is not None:
            _, ids = chat.render(request)
        else:
            ids = completion.encode(request.prompt or "", request.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.model_name(request.model)
        bad = next((t for t in request.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise ValueError(f"tokens contains {bad}, outside the vocabulary "
                             f"[0, {engine.vocab_size})")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))

    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    app.add_middleware(GuardMiddleware, api_key=server.api_key,  # type: ignore[arg-type]
                       max_body=server.max_request_body_bytes)
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents validation failures as 422; this server answers 400 (OpenAI's code),
    already listed for every route."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        error = from_exception(exc)
        if error.status >= 500 and not isinstance(exc, (QueueFullError, EngineDeadError)):
            logger.error("request failed", exc_info=exc)
        return error_response(error)

    async def invalid(_: Request, exc: Exception) -> Response:
        return error_response(validation_error(list(exc.errors())))  # type: ignore[attr-defined]

    async def http(_: Request, exc: Exception) -> Response:
        return error_response(http_error(exc.status_code, exc.detail))  # type: ignore

    async def gone(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody is listening; never seen by a client

    for cls in (APIError, ValueError, QueueFullError, EngineDeadError, Exception):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(ClientDisconnected, gone)


# ---------------------------------------------------------------------------- running
@dataclass
class Server:
    """A built server: the app, its engine and its metrics."""

    app: Any
    engine: AsyncEngine
    metrics: ServerMetrics
    config: ServerConfig
    served_model_names: list[str]


def build_server(engine_config: EngineConfig, server: ServerConfig) -> Server:
    """Load the model (blocking) and build the app around it."""
    names = list(server.served_model_name or [engine_config.model.model])
    metrics = ServerMetrics(names[0])
    engine = AsyncEngine(engine_config, max_queued_requests=server.max_queued_requests,
                         observer=metrics)
    tokenizer = load_tokenizer(engine_config.model.tokenizer or engine_config.model.model)
    app = build_app(engine, tokenizer, names, server, metrics)
    return Server(app, engine, metrics, server, names)


def run_server(engine_config: EngineConfig, server: ServerConfig) -> None:
    """`kestrel serve`: load, then serve until interrupted."""
    import uvicorn

    built = build_server(engine_config, server)
    logger.info("serving %s on http://%s:%d", built.served_model_names, server.host, server.port)
    try:
        uvicorn.run(built.app, host=server.host, port=server.port, log_level=server.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        built.engine.shutdown()


class ServerThread:
    """Serve an app from a background thread (tests, notebooks): `start()` returns once the
    socket listens; `stop()` shuts uvicorn down. port=0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=2)
        # NOTE: uvicorn installs signal handlers only on the main thread, so Ctrl-C still
        # reaches the host program.
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="kestrel-http",
                                       daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
