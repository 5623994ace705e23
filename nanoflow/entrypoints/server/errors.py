"""OpenAI error bodies for every failure: client mistakes are 4xx, only true server bugs are 500."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from nanoflow.entrypoints.server.async_engine import EngineDeadError
from nanoflow.entrypoints.server.protocol import OpenAIError, error_body

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    # ensure_ascii: a lone surrogate from the request ("\ud800") echoed in a message must not turn
    # an error response into an encoding crash.
    return Response(json.dumps(body, ensure_ascii=True), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> Response:
    return json_response(status, error_body(message, type, param, code))


def _is_type_label(part: object) -> bool:
    """pydantic puts the union member tried into loc ('prompt', 'list[int]', 0): not a field."""
    return isinstance(part, str) and (part in _TYPE_LABELS or "[" in part or part.startswith("function-"))


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "TextContentPart"})


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(x) for x in err.get("loc", ())[1:] if not _is_type_label(x)]  # loc[0] is "body"
    param = loc[0] if loc else None
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"We could not parse the JSON body of your request ({detail}).", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        if not loc:
            return "The request body is required.", None
        return f"Missing required parameter: '{'.'.join(loc)}'.", param
    where = ".".join(loc) if loc else "body"
    return f"Invalid value for '{where}': {msg}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError) -> Response:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> Response:
        errors = list(e.errors())
        message, param = _validation_message(errors[0]) if errors else ("Invalid request.", None)
        if len(errors) > 1:
            message += f" ({len(errors) - 1} more error(s))"
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> Response:
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return error_response(e.status_code, detail, _HTTP_TYPES.get(e.status_code, "invalid_request_error"))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> Response:
        return error_response(503, str(e), "service_unavailable_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(e).__name__}", "internal_server_error")

