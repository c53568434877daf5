"""The /openapi.json the server publishes, made to match what it answers.

FastAPI documents a 422 for every route with a body, but this server answers
every invalid request with a 400 in OpenAI's error shape, and it answers errors
FastAPI cannot see (401 from the key check, 413 from the body limit, 429 from
the admission bound, 503 from a dead engine, 504 from the deadline). Streaming
endpoints also answer ``text/event-stream``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pagedllm.server.protocol import ErrorResponse

# Status -> description, for every /v1 route.
_V1_ERRORS = {
    "400": "Invalid request (a field is named in error.param; null for whole-body errors)",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "413": "Request body larger than --max-request-body-bytes",
    "429": "Too many unfinished requests (--max-waiting-requests); see Retry-After",
    "500": "Unexpected server error (a generic message with a request id)",
    "503": "The engine is not running",
    "504": "The request passed --request-timeout and was aborted",
}
_STREAMING_PATHS = ("/v1/completions", "/v1/chat/completions")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that builds the corrected schema once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = fix_schema(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def fix_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """400 instead of 422, the error responses the server really sends, SSE on streaming routes."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(components["ErrorResponse"].pop("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1"):
                for status, description in _V1_ERRORS.items():
                    responses[status] = {"description": description,
                                         "content": {"application/json": {"schema": _ERROR_REF}}}
            if path in _STREAMING_PATHS:
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": "Server-sent events (stream=true): "
                               "`data: <chunk JSON>` lines, then `data: [DONE]`"}}
    return schema
