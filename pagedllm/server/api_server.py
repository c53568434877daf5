"""The OpenAI-compatible HTTP server: app factory, routes, auth, error shape, and ``pagedllm serve``.

    pagedllm serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine options]

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /version, GET /metrics. Every error, including pydantic's
validation errors and unknown routes, is answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. With an API key set, the
/v1 routes need ``Authorization: Bearer <key>`` (compared in constant time).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.lifecycle import LifecycleConfig, PagedServer, ServeProcesses, health_problem
from pagedllm.server.metrics import ServerMetrics
from pagedllm.server.openapi import install_openapi
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pagedllm.server.serving_chat import OpenAIServingChat
from pagedllm.server.serving_completion import OpenAIServingCompletion
from pagedllm.server.serving_engine import (
    OpenAIError,
    ServingLimits,
    SSEStream,
    bad_request,
    cancel_on_disconnect,
    request_timeout_error,
    to_openai_error,
    value_error_to_400,
)

logger = logging.getLogger(__name__)

DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_WAITING_REQUESTS = 1024
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024


def pagedllm_version() -> str:
    try:
        return version("pagedllm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class _SSEResponse(StreamingResponse):
    """A streamed response that aborts its requests however it ends (done, error, disconnect)."""

    def __init__(self, content: SSEStream) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.sse = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.sse.aclose()


class _ApiKeyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so ``receive`` still reports client disconnects to handlers."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                message = "Incorrect API key provided." if token else "Missing API key: send Authorization: Bearer."
                error = OpenAIError(message, 401, "invalid_request_error", None, "invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: by Content-Length before reading, else as soon as the count passes it.

    The body is read here (at most ``max_bytes`` held) and replayed to the app, so a
    50 MB upload is refused after 16 MiB, not buffered whole. Pure ASGI, like the key check.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self) -> Response:
        message = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
        return OpenAIError(message, 413, "invalid_request_error", None, "request_too_large").to_response()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the client's later messages (disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's errors -> one readable 400; no input echo, no pydantic URLs or internals."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {msg}")
    if not loc and first.get("type") == "value_error":  # a model-level check (ours), whose message names the field
        return value_error_to_400(msg)
    if not loc:  # the body as a whole (not an object, null): no field to name
        return bad_request(f"request body: {msg}")
    field = loc[0]
    # A union field (prompt, stop) reports one error per alternative: say so instead of the first.
    alternatives = {str(e.get("msg")) for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1]
                    == [field]}
    if len(alternatives) > 1 and first.get("type") != "missing":
        return bad_request(f"{field}: invalid type or value ({'; '.join(sorted(alternatives)[:3])})", field)
    path = field + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    return bad_request(f"{path}: {msg}", field)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc).to_response()

    @app.exception_handler(OpenAIError)
    async def _on_openai(_: Request, exc: OpenAIError) -> Response:
        return exc.to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return OpenAIError(str(exc.detail), exc.status_code, kind).to_response()

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> Response:
        return to_openai_error(exc).to_response()

    @app.exception_handler(UnicodeError)
    async def _on_unicode(_: Request, exc: UnicodeError) -> Response:
        # A string that slipped past the request models' check (a header, a path): the input, not us.
        return bad_request(f"invalid Unicode in the request: {exc.reason}").to_response()


async def _respond(raw: Request, stream: bool, create: Callable[[], Awaitable[Any]],
                   timeout: float | None = None) -> Response:
    """Run a serving call; JSON for a whole response, SSE for a stream, the error shape for errors.

    With ``timeout``, a whole response not ready in time is cancelled (which aborts its
    requests and frees their blocks) and answered 504; a stream enforces it per event.
    """

    async def handle() -> Response:
        try:
            result = await (create() if timeout is None or stream else asyncio.wait_for(create(), timeout))
        except TimeoutError:
            return request_timeout_error().to_response()
        except Exception as e:
            return to_openai_error(e).to_response()
        if isinstance(result, SSEStream):
            return _SSEResponse(result)
        return JSONResponse(result.model_dump())

    if stream:  # Starlette cancels a streamed body itself when the client leaves
        return await handle()
    return await cancel_on_disconnect(raw, handle())


def build_app(engine: AsyncEngine, served_model_name: str | list[str] | None = None,
              api_key: str | None = None, lifecycle: LifecycleConfig | None = None,
              limits: ServingLimits | None = None,
              max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine``; each app has its own metrics registry."""
    lifecycle = lifecycle or LifecycleConfig()
    if served_model_name is None:
        served_model_name = engine.model_config.model or DEFAULT_SERVED_MODEL_NAME
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    limits = limits or ServingLimits()
    completion = OpenAIServingCompletion(engine, names, limits)
    chat = OpenAIServingChat(engine, names, limits)
    metrics = ServerMetrics(engine, names[0])

    app = FastAPI(title="pagedllm", version=pagedllm_version())
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)
    install_openapi(app)
    if max_request_body_bytes is not None:  # added before the key check, so it runs after it
        app.add_middleware(_BodyLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        """200, or 503 when the engine is dead, stalled (see --health-stall-timeout) or shutting down."""
        problem = health_problem(engine, lifecycle.health_stall_timeout)
        if problem is not None:
            return OpenAIError(problem, 503, "server_error", code="unhealthy").to_response()
        return Response(status_code=200)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": pagedllm_version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        root, max_model_len = engine.model_config.model, engine.model_config.max_model_len
        cards = [ModelCard(id=name, root=root, max_model_len=max_model_len) for name in names]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await _respond(raw, bool(request.stream), lambda: completion.create_completion(request),
                              limits.request_timeout)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await _respond(raw, bool(request.stream), lambda: chat.create_chat_completion(request),
                              limits.request_timeout)

    return app


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm serve",
                                     description="Serve a model over the OpenAI API (default: SmolLM2-135M).")
    EngineArgs.add_cli_args(parser, model_positional=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"),
                        help="require this key on /v1 routes (default: $PAGEDLLM_API_KEY)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    # Process life (server/lifecycle.py).
    parser.add_argument("--health-stall-timeout", type=_positive_float, default=60.0,
                        help="/health answers 503 once the engine has had work for this many seconds "
                             "without completing a step (default 60)")
    parser.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                        help="on SIGTERM, drain requests in flight for at most this many seconds, "
                             "then abort the rest (default 30)")
    parser.add_argument("--no-exit-on-engine-death", dest="exit_on_engine_death", action="store_false",
                        help="keep serving 503 when the engine dies instead of exiting with status 1")
    _add_admission_args(parser)
    _add_process_args(parser)
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def lifecycle_config(args: argparse.Namespace) -> LifecycleConfig:
    return LifecycleConfig(args.health_stall_timeout, args.shutdown_timeout, args.exit_on_engine_death)


def _add_admission_args(parser: argparse.ArgumentParser) -> None:
    """Admission control: what one request may ask for, and how many the server holds at once."""
    d = ServingLimits()
    group = parser.add_argument_group("admission control")
    group.add_argument("--max-n", type=_positive_int, default=d.max_n, help="largest n and best_of (400 above)")
    group.add_argument("--max-prompts-per-request", type=_positive_int, default=d.max_prompts_per_request,
                       help="most prompts in one /v1/completions request (400 above)")
    group.add_argument("--max-stop-strings", type=_positive_int, default=d.max_stop_strings)
    group.add_argument("--max-stop-string-chars", type=_positive_int, default=d.max_stop_string_chars)
    group.add_argument("--max-waiting-requests", type=_positive_int, default=DEFAULT_MAX_WAITING_REQUESTS,
                       help="unfinished requests held at once; more get 429 with Retry-After")
    group.add_argument("--max-request-body-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="larger request bodies get 413")
    group.add_argument("--request-timeout", type=float, default=None,
                       help="seconds until a request is aborted and answered 504 (default: no deadline)")


# --- engine core process (issue 10) ---
def _add_process_args(parser: argparse.ArgumentParser) -> None:
    """Which processes serve: the engine in its own process (default) and how many HTTP front ends."""
    group = parser.add_argument_group("processes")
    group.add_argument("--api-server-count", type=_positive_int, default=1,
                       help="HTTP front-end processes sharing the port, all talking to the one engine process")
    group.add_argument("--engine-in-process", action="store_true",
                       help="run the engine on a thread of the server process instead of its own (debugging)")
    # Set by the first front end when it starts the others (--api-server-count); not for users.
    group.add_argument("--front-end-of", default=None, help=argparse.SUPPRESS)


def _serve_processes(argv: list[str], args: argparse.Namespace, engine_args: EngineArgs) -> ServeProcesses:
    try:
        return ServeProcesses(argv, engine_args, args.api_server_count, args.engine_in_process, args.front_end_of)
    except ValueError as e:
        raise SystemExit(f"pagedllm serve: error: {e}") from e
# --- end engine core process ---


def _limits_from_args(args: argparse.Namespace) -> ServingLimits:
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise SystemExit("--request-timeout must be > 0")
    return ServingLimits(max_n=args.max_n, max_prompts_per_request=args.max_prompts_per_request,
                         max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
                         request_timeout=args.request_timeout)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """``pagedllm serve``: load the engine, serve until SIGTERM (exit 0) or engine death (exit 1)."""
    import uvicorn

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = make_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_args = EngineArgs.from_cli_args(args)
    limits = _limits_from_args(args)
    processes = _serve_processes(argv, args, engine_args)
    engine = processes.start_engine(args.max_waiting_requests)
    name = engine_args.served_model_name or engine_args.model or DEFAULT_SERVED_MODEL_NAME
    lifecycle = lifecycle_config(args)
    app = build_app(engine, name, args.api_key, lifecycle, limits, args.max_request_body_bytes)
    logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    server = PagedServer(config, engine, lifecycle, processes.front_ends)
    try:
        server.run(sockets=processes.sockets(args.host, args.port))
    finally:
        processes.shutdown(engine, lifecycle.shutdown_timeout + 5.0)
    if server.exit_code:
        sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
