"""The FastAPI app (build_app) and the process around it (run_server: uvicorn, signals, exit code)."""

from __future__ import annotations

import contextlib
import copy
import hmac
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoflow import __version__
from nanoflow.engine.engine import LLMEngine
from nanoflow.engine_args import EngineArgs
from nanoflow.entrypoints.server.async_engine import AsyncEngine
from nanoflow.entrypoints.server.chat import create_chat_completion
from nanoflow.entrypoints.server.completions import create_completion
from nanoflow.entrypoints.server.errors import error_response, install_error_handlers, json_response
from nanoflow.entrypoints.server.generation_config import load_sampling_defaults
from nanoflow.entrypoints.server.metrics import EngineMetrics
from nanoflow.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
    TokenizeResponse,
)
from nanoflow.entrypoints.server.serving import ServerContext

log = logging.getLogger(__name__)

# Probes and scrapers must work without the API key.
_OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs",
                         "/docs/oauth2-redirect", "/redoc"})
_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ping", "/version",
                     "/metrics", "/tokenize", "/detokenize"})
# vLLM endpoints of features nanoflow does not have: a 404 that names the feature, not a bare "Not Found".
_MISSING_ENDPOINTS = {"/v1/embeddings": "embeddings", "/pooling": "pooling", "/classify": "classification",
                      "/score": "scoring", "/v1/score": "scoring", "/rerank": "reranking", "/v1/rerank": "reranking",
                      "/v1/audio/transcriptions": "audio transcription"}


class _Gate:
    """Pure ASGI middleware (BaseHTTPMiddleware would break streaming disconnect detection):
    checks the API key and counts responses by route and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: EngineMetrics | None) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        # A bounded label set: unknown paths (scanners, typos) all count as "other".
        route = path if path in _ROUTES else "other"
        if path.startswith("/v1/models/"):
            route = "/v1/models/{model}"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.metrics is not None:
                self.metrics.http_response(route, message["status"])
            await send(message)

        if self.api_key is not None and path not in _OPEN_PATHS:
            problem = self._auth_problem(scope)
            if problem is not None:
                resp = error_response(401, problem, "invalid_request_error", code="invalid_api_key")
                await resp(scope, receive, counting_send)
                return
        await self.app(scope, receive, counting_send)

    def _auth_problem(self, scope: Scope) -> str | None:
        header = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v
                break
        if not header:
            return "You didn't provide an API key: send it as 'Authorization: Bearer KEY'."
        scheme, _, key = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return "Incorrect API key provided."
        return None


def build_app(async_engine: AsyncEngine, served_names: Sequence[str], api_key: str | None = None,
              chat_template: str | None = None, sampling_defaults: dict[str, Any] | None = None,
              log_requests: bool = True) -> FastAPI:
    """The OpenAI-compatible app. Its lifespan starts the engine thread and stops it at shutdown.
    served_names: all accepted in requests, the first reported; chat_template: replaces the
    tokenizer's (--chat-template); sampling_defaults: --generation-config's."""
    names = tuple(served_names)
    if not names:
        raise ValueError("at least one served model name is needed")
    # A copy of the engine's tokenizer, not a second load from disk (why a copy: ServerContext.tokenizer);
    # it also keeps --chat-template off the engine's.
    engine_tok = async_engine.engine.tokenizer
    tok = copy.deepcopy(engine_tok) if engine_tok is not None else None
    if chat_template is not None:
        if tok is None:
            raise ValueError("--chat-template needs a tokenizer (the server runs with --skip-tokenizer-init)")
        tok.chat_template = chat_template
    ctx = ServerContext(async_engine, tok, names, dict(sampling_defaults or {}), log_requests)
    metrics = async_engine.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        # uvicorn has already waited for (or cancelled) the in-flight responses.
        async_engine.shutdown()

    app = FastAPI(title="nanoflow", description="OpenAI-compatible API", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404)}

    @app.post("/v1/completions", responses=errors)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions", responses=errors)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    def card() -> ModelCard:
        return ModelCard(id=ctx.model_name, root=async_engine.engine.config.model,
                         max_model_len=async_engine.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        ctx.check_model(model)
        return card()

    @app.get("/health")
    async def health() -> Response:
        if async_engine.healthy:
            return Response(status_code=200)
        return error_response(503, "the engine is not running", "service_unavailable_error")

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        # vLLM's (SageMaker's) liveness probe: the same answer as /health.
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    for path, feature in _MISSING_ENDPOINTS.items():
        app.add_api_route(path, _missing(feature, path), methods=["POST"], include_in_schema=False)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return error_response(404, "metrics are disabled", "not_found_error")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize", responses=errors)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.log_ignored_fields(body)
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            _, ids = ctx.apply_chat_template(body.messages, body.add_generation_prompt)
        else:
            ids = ctx.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=async_engine.max_model_len)

    @app.post("/detokenize", responses=errors)
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.log_ignored_fields(body)
        ctx.check_model(body.model)
        text = ctx.decode(body.tokens)
        return json_response(200, DetokenizeResponse(prompt=text).model_dump())

    return app


def _missing(feature: str, path: str) -> Callable[[], Awaitable[Response]]:
    async def endpoint() -> Response:
        return error_response(404, f"{feature}: not supported by nanoflow (no {path} endpoint); it serves "
                              "generative models through /v1/completions and /v1/chat/completions",
                              "not_found_error", code="not_supported")

    return endpoint


def read_chat_template(value: str) -> str:
    """--chat-template as vLLM takes it: a file's path, or the Jinja template itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file (give a Jinja template file or the template text)")


class _Server(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT mean "shut down gracefully and exit 0".

    Recent uvicorn re-raises the captured signal after its graceful shutdown, which turns a clean
    stop into exit code 143 / a KeyboardInterrupt; this keeps the graceful part only.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, handler in original.items():
                signal.signal(s, handler)


def run_server(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000,
               served_model_name: str | Sequence[str] | None = None, api_key: str | None = None,
               graceful_timeout_s: float = 30.0, chat_template: str | None = None,
               generation_config: str = "auto", disable_log_requests: bool = False,
               uvicorn_log_level: str = "info") -> int:
    """Serves until SIGTERM/SIGINT: then stops accepting, lets in-flight requests finish for up to
    graceful_timeout_s, aborts the rest, and returns 0. The vLLM-named options: chat_template (a
    file or the template), generation_config (auto | vllm | PATH), disable_log_requests, uvicorn_log_level."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not served_model_name:
        names: tuple[str, ...] = (args.model,)
    elif isinstance(served_model_name, str):
        names = (served_model_name,)
    else:
        names = tuple(served_model_name)
    # Bad option values fail before the model loads.
    template = read_chat_template(chat_template) if chat_template is not None else None
    defaults = load_sampling_defaults(generation_config, args.model)
    if defaults:
        log.info("--generation-config %s: sampling defaults %s for requests that leave them unset",
                 generation_config, defaults)
    metrics = EngineMetrics(names[0])
    async_engine = AsyncEngine(LLMEngine.from_args(args), metrics)
    app = build_app(async_engine, names, api_key, chat_template=template, sampling_defaults=defaults,
                    log_requests=not disable_log_requests)
    log.info("serving %s as %s on http://%s:%d (max_model_len=%d, %d KV pages)", args.model,
             " / ".join(repr(n) for n in names), host, port, async_engine.max_model_len, async_engine.num_pages)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level, lifespan="on",
                                    timeout_graceful_shutdown=int(graceful_timeout_s)))
    server.run()
    async_engine.shutdown()  # idempotent; covers a startup that failed before the lifespan ran
    return 0 if server.started else 1
