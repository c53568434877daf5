"""The OpenAI-compatible HTTP server: app factory, routes, auth, error shape, and ``pagedllm serve``.

    pagedllm serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine options]

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize, GET|POST /ping, GET /health, GET /version, GET /metrics
(/v1/embeddings answers 404 with the reason: docs/API_FIELDS.md). Every error, including pydantic's
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
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.lifecycle import LifecycleConfig, PagedServer, ServeProcesses, health_problem
from pagedllm.server.lora_modules import LoRAModulePath, LoRAModules, parse_lora_module, runtime_updates_allowed
from pagedllm.server.metrics import ServerMetrics
from pagedllm.server.openapi import install_openapi
from pagedllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from pagedllm.server.serving_chat import ChatOptions, OpenAIServingChat
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
from pagedllm.server.serving_tokenization import OpenAIServingTokenization
from pagedllm.server.tool_parsers import TOOL_PARSERS

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
              max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES,
              chat_options: ChatOptions | None = None, loras: LoRAModules | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; each app has its own metrics registry. ``loras``: the LoRA
    adapters served by name (``--enable-lora``; None: LoRA off)."""
    lifecycle = lifecycle or LifecycleConfig()
    if served_model_name is None:
        served_model_name = engine.model_config.model or DEFAULT_SERVED_MODEL_NAME
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    limits = limits or ServingLimits()
    completion = OpenAIServingCompletion(engine, names, limits, loras)
    chat = OpenAIServingChat(engine, names, limits, chat_options, loras)
    tokenization = OpenAIServingTokenization(engine, names, limits, loras)
    metrics = ServerMetrics(engine, names[0])

    app = _new_app(engine, metrics, api_key, max_request_body_bytes)

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

    model_names, model_card = _add_model_routes(app, engine, names, loras)
    _add_extra_routes(app, model_names, model_card, tokenization, health)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await _respond(raw, bool(request.stream), lambda: completion.create_completion(request),
                              limits.request_timeout)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await _respond(raw, bool(request.stream), lambda: chat.create_chat_completion(request),
                              limits.request_timeout)

    return app


def _new_app(engine: AsyncEngine, metrics: ServerMetrics, api_key: str | None,
             max_request_body_bytes: int | None) -> FastAPI:
    """The app with its state, error handlers, OpenAPI document and middleware, before any route."""
    app = FastAPI(title="pagedllm", version=pagedllm_version())
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)
    install_openapi(app)
    if max_request_body_bytes is not None:  # added before the key check, so it runs after it
        app.add_middleware(_BodyLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    return app


def _add_model_routes(app: FastAPI, engine: AsyncEngine, names: list[str], loras: LoRAModules | None
                      ) -> tuple[Callable[[], list[str]], Callable[[str], ModelCard]]:
    """/v1/models (the base model's names, then each LoRA adapter) and the runtime adapter routes;
    returns (the names served now, a name's card) for the other routes."""

    def model_card(name: str) -> ModelCard:
        adapter = loras.get(name) if loras is not None else None
        if adapter is not None:  # vLLM's card of an adapter: its path as root, the base model as parent
            return ModelCard(id=name, root=adapter.lora_path, parent=names[0],
                             max_model_len=engine.model_config.max_model_len)
        return ModelCard(id=name, root=engine.model_config.model, max_model_len=engine.model_config.max_model_len)

    def model_names() -> list[str]:
        return names + ([a.lora_name for a in loras] if loras is not None else [])

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[model_card(name) for name in model_names()]).model_dump()

    if loras is not None and loras.enabled and runtime_updates_allowed():
        _add_lora_routes(app, loras)
    return model_names, model_card


def _add_lora_routes(app: FastAPI, loras: LoRAModules) -> None:
    """vLLM's runtime adapter routes (on with VLLM_ALLOW_RUNTIME_LORA_UPDATING; see server/lora_modules.py)."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        try:
            await loras.add_async(request.lora_name, request.lora_path)
        except ValueError as e:
            raise OpenAIError(str(e), 400, "invalid_request_error", "lora_path", "invalid_lora_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        try:
            loras.remove(request.lora_name)
        except KeyError:
            raise OpenAIError(f"The lora adapter '{request.lora_name}' cannot be found.", 404,
                              "invalid_request_error", "lora_name", "lora_adapter_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")


def _add_extra_routes(app: FastAPI, names: Callable[[], list[str]], model_card: Callable[[str], ModelCard],
                      tokenization: OpenAIServingTokenization, health: Callable[[], Awaitable[Response]]) -> None:
    """The vLLM routes beside the OpenAI ones: one model's card, /tokenize, /detokenize, /ping, embeddings."""

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in names():
            raise OpenAIError(f"The model `{model_id}` does not exist.", 404, "invalid_request_error", "model",
                              "model_not_found")
        return model_card(model_id).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        return (await tokenization.tokenize(request)).model_dump(exclude_none=True)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        return (await tokenization.detokenize(request)).model_dump()

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """SageMaker's liveness route, as vLLM serves it: the same answer as /health."""
        return await health()

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        # Pooling needs the final hidden state, which the model runner does not return (docs/API_FIELDS.md).
        return OpenAIError("This server runs generative models only: /v1/embeddings is not available "
                           "(see docs/API_FIELDS.md).", 404, "invalid_request_error", None,
                           "embeddings_not_supported").to_response()


def make_arg_parser() -> argparse.ArgumentParser:
    """``pagedllm serve``'s flags: vLLM's names, each with its help and default."""
    from pagedllm.vllm_flags import add_vllm_compat_args

    parser = argparse.ArgumentParser(prog="pagedllm serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Serve a model over the OpenAI API (default: SmolLM2-135M).")
    parser.add_argument("--config", default=None, help="YAML file of flags (names without --); "
                                                       "flags on the command line win")
    EngineArgs.add_cli_args(parser, model_positional=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"),
                        help="require this key on /v1 routes (default: $PAGEDLLM_API_KEY)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    parser.add_argument("--debug", action="store_true", help="debug logs, and tracebacks with start-up errors")
    _add_frontend_args(parser)
    # Process life (server/lifecycle.py).
    parser.add_argument("--health-stall-timeout", type=_positive_float, default=60.0,
                        help="/health answers 503 once the engine has had work for this many seconds "
                             "without completing a step")
    parser.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                        help="on SIGTERM, drain requests in flight for at most this many seconds, "
                             "then abort the rest")
    parser.add_argument("--no-exit-on-engine-death", dest="exit_on_engine_death", action="store_false",
                        help="keep serving 503 when the engine dies instead of exiting with status 1")
    _add_admission_args(parser)
    # --- tools and request fields (issue 16) ---
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='allow tool_choice "auto" (needs --tool-call-parser); without it "auto" is a 400')
    parser.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                        help="how tool calls are read from replies under tool_choice auto (the default model "
                             "writes hermes-style <tool_call> blocks)")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="accept a chat_template in requests (off: a 400), since a template can run "
                             "for as long as it likes on the tokenizer thread")
    parser.add_argument("--max-logprobs", type=_logprobs_bound, default=ServingLimits().max_logprobs,
                        help="largest logprobs / top_logprobs / prompt_logprobs a request may ask for (0-20)")
    # --- end tools and request fields ---
    parser.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                        help='LoRA adapters served by name (with --enable-lora): name=path or '
                             '\'{"name": ..., "path": ...}\'; a request\'s "model" picks one')
    _add_process_args(parser)
    add_vllm_compat_args(parser)
    return parser


def _add_frontend_args(parser: argparse.ArgumentParser) -> None:
    """Logging, CORS, root path and TLS: vLLM's frontend flags."""
    group = parser.add_argument_group("frontend")
    group.add_argument("--disable-log-requests", action="store_true", default=False,
                       help="no log line per request (id, prompt length, sampling parameters)")
    group.add_argument("--enable-log-requests", action="store_true", help="log a line per request (the default)")
    group.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput / queue / KV lines")
    group.add_argument("--allowed-origins", type=_string_list, default=["*"],
                       help="CORS origins: a JSON list or comma-separated")
    group.add_argument("--allowed-methods", type=_string_list, default=["*"], help="CORS methods")
    group.add_argument("--allowed-headers", type=_string_list, default=["*"], help="CORS headers")
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument("--root-path", default=None, help="path prefix when behind a path-based proxy")
    group.add_argument("--ssl-keyfile", default=None, help="TLS private key file (with --ssl-certfile: HTTPS)")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    group.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify clients with")
    group.add_argument("--ssl-cert-reqs", type=int, default=0,
                       help="whether client certificates are required (Python ssl.CERT_* value)")


def _string_list(text: str) -> list[str]:
    import json

    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(values, list):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return [str(v) for v in values]
    return [part.strip() for part in text.split(",") if part.strip()]


def add_cors(app: FastAPI, args: argparse.Namespace) -> None:
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_credentials=args.allow_credentials,
                       allow_methods=args.allowed_methods, allow_headers=args.allowed_headers)


def uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` from the frontend flags."""
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: pass both for HTTPS")
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise ValueError(f"--{name.replace('_', '-')}: {path!r} does not exist")
    return {"host": args.host, "port": args.port, "log_level": args.uvicorn_log_level,
            "root_path": args.root_path or "", "ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile,
            "ssl_ca_certs": args.ssl_ca_certs, "ssl_cert_reqs": args.ssl_cert_reqs}


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """The serve flags with ``--config`` expanded; usage errors exit 2 as argparse does, an unreadable
    config file is a ValueError."""
    from pagedllm.vllm_flags import expand_config_file

    parser = make_arg_parser()
    return parser.parse_args(expand_config_file(argv, parser))


def check_port_free(host: str, port: int) -> None:
    """ValueError when ``host:port`` cannot be bound, found before the model is loaded (seconds, not minutes)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                             "(is another server running there? pick another --port)") from None


def _logprobs_bound(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 20:  # the engine computes at most 20 per position (SamplingParams)
        raise argparse.ArgumentTypeError(f"must be in [0, 20], got {value}")
    return value


def chat_options(args: argparse.Namespace) -> ChatOptions:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    return ChatOptions(args.enable_auto_tool_choice, args.tool_call_parser, args.trust_request_chat_template)


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
    group.add_argument("--max-stop-strings", type=_positive_int, default=d.max_stop_strings,
                       help="most stop strings in one request (400 above)")
    group.add_argument("--max-stop-string-chars", type=_positive_int, default=d.max_stop_string_chars,
                       help="longest stop string, in characters (400 above)")
    group.add_argument("--max-waiting-requests", type=_positive_int, default=DEFAULT_MAX_WAITING_REQUESTS,
                       help="unfinished requests held at once; more get 429 with Retry-After")
    group.add_argument("--max-request-body-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="larger request bodies get 413")
    group.add_argument("--request-timeout", type=float, default=None,
                       help="seconds until a request is aborted and answered 504; None: no deadline")


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


def _precheck_lora_modules(engine_args: EngineArgs, modules: list[LoRAModulePath] | None) -> None:
    """Before the model loads: --lora-modules needs --enable-lora, and each adapter's config must be servable."""
    lora_config = engine_args.lora_config()
    if not modules:
        return
    if lora_config is None:
        raise ValueError("--lora-modules needs --enable-lora")
    from pagedllm.lora.adapter import read_adapter_config  # imports torch: only when there are adapters

    for module in modules:
        read_adapter_config(module.path, lora_config.max_lora_rank)


def _lora_modules(engine_args: EngineArgs, engine: AsyncEngine, name: str | list[str],
                  modules: list[LoRAModulePath] | None) -> LoRAModules | None:
    """The adapters of ``--lora-modules``, checked now (None with LoRA off)."""
    lora_config = engine_args.lora_config()
    if lora_config is None:
        if modules:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    loras = LoRAModules(lora_config, engine.model_config.hf_config, [name] if isinstance(name, str) else list(name))
    for module in modules or []:
        loras.add(module.name, module.path)
    return loras


def _limits_from_args(args: argparse.Namespace) -> ServingLimits:
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise SystemExit("--request-timeout must be > 0")
    return ServingLimits(max_n=args.max_n, max_prompts_per_request=args.max_prompts_per_request,
                         max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
                         request_timeout=args.request_timeout, max_logprobs=args.max_logprobs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """``pagedllm serve``: load the engine, serve until SIGTERM (exit 0) or engine death (exit 1).

    Start-up failures (a bad flag value, a model that cannot load, a port in use)
    are one line on stderr and exit status 1; ``--debug`` adds the traceback.
    """
    import uvicorn

    from pagedllm.logging_utils import configure_logging, exit_on_error
    from pagedllm.vllm_flags import check_vllm_compat_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    debug = "--debug" in argv
    try:
        args = parse_serve_args(argv)
        configure_logging("debug" if args.debug else None)
        for note in check_vllm_compat_args(args):  # raises for a feature not built yet
            logger.info("%s", note)
        uvicorn_kwargs = uvicorn_options(args)
        if args.front_end_of is None:  # the first front end binds the port; the others share it
            check_port_free(args.host, args.port)
        engine_args = EngineArgs.from_cli_args(args)
        engine_args.disable_log_requests = args.disable_log_requests
        engine_args.disable_log_stats = args.disable_log_stats
        limits = _limits_from_args(args)
        options = chat_options(args)
        _precheck_lora_modules(engine_args, args.lora_modules)
        processes = _serve_processes(argv, args, engine_args)
        engine = processes.start_engine(args.max_waiting_requests)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - start-up errors become one line
        exit_on_error("pagedllm serve", e, debug)
    name = engine_args.served_model_name or engine_args.model or DEFAULT_SERVED_MODEL_NAME
    lifecycle = lifecycle_config(args)
    try:
        loras = _lora_modules(engine_args, engine, name, args.lora_modules)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - a bad adapter is a start-up error too
        engine.shutdown()
        exit_on_error("pagedllm serve", e, debug)
    app = build_app(engine, name, args.api_key, lifecycle, limits, args.max_request_body_bytes, options, loras)
    add_cors(app, args)
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("serving %s on %s://%s:%d%s", name, scheme, args.host, args.port, args.root_path or "")
    config = uvicorn.Config(app, **uvicorn_kwargs)
    server = PagedServer(config, engine, lifecycle, processes.front_ends)
    try:
        server.run(sockets=processes.sockets(args.host, args.port))
    finally:
        processes.shutdown(engine, lifecycle.shutdown_timeout + 5.0)
    if server.exit_code:
        sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
