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


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _loc(err: dict[str, Any]) -> list[str]:
    """The path of the failed field inside the body (empty: the body itself)."""
    return [str(x) for x in err.get("loc", ())[1:] if not _is_type_label(x)]  # loc[0] is "body"


def _param(err: dict[str, Any]) -> str | None:
    loc = _loc(err)
    return loc[0] if loc else None


def _validation_message(err: dict[str, Any], content_type: str) -> tuple[str, str | None]:
    loc, param = _loc(err), _param(err)
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if not loc and content_type and not _is_json(content_type):
        # FastAPI hands a non-JSON content type's body over as bytes; curl -d sends form encoding.
        return (f"The request body must be JSON, sent with 'Content-Type: application/json' "
                f"(this request has Content-Type '{content_type}')."), None
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"The request body must be valid JSON: it could not be parsed ({detail}).", None
    if kind == "missing":
        if not loc:
            return "The request body is required: a JSON object.", None
        return f"Missing required parameter: '{'.'.join(loc)}'.", param
    if not loc:
        return "The request body must be a JSON object ({...}), " + f"not {_json_kind(err.get('input'))}.", None
    where = ".".join(loc)
    return f"Invalid value for '{where}': {msg}.", param


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             bytes: "raw bytes", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError) -> Response:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> Response:
        errors = list(e.errors())
        content_type = request.headers.get("content-type", "")
        message, param = _validation_message(errors[0], content_type) if errors else ("Invalid request.", None)
        # A union field (stop: a string or a list of strings) fails once per member: one message
        # about it is enough; other fields that failed as well are named, not counted.
        others = list(dict.fromkeys(p for p in map(_param, errors[1:]) if p is not None and p != param))
        if others:
            message += " Also invalid: " + ", ".join(f"'{p}'" for p in others) + "."
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

