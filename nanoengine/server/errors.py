"""Every failure as OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients turn the status into an exception class (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, ...) and show ``message``, so each refusal
says what was wrong. FastAPI's own defaults (422 for a bad body, ``{"detail": ...}``) would
confuse them; the handlers here replace those. Nothing a client sends may crash the
server: an unexpected exception becomes a 500 with the same shape.
"""

from __future__ import annotations

import http
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("nanoengine")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
# "temperature must be ..." -> the field is "temperature" (SamplingParams' messages start so).
_FIELD_FIRST = re.compile(r"^([a-z_]+) (?:must|has|needs)\b")


class APIError(Exception):
    """A refusal with its HTTP status (404 unknown model, 503 queue full, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape; ``code`` is the HTTP status (as vLLM)."""
    kind = _TYPES.get(status) or http.HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def value_error_param(message: str) -> str | None:
    """The field a ValueError's message names first, if it names one."""
    match = _FIELD_FIRST.match(message)
    return match.group(1) if match else None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A short, readable summary of pydantic's errors and the first field at fault."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        return f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}", None
    parts, first_param = [], None
    for error in errors[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or (loc[0] if loc else None)
        if error.get("type") == "extra_forbidden":  # a field the server would not act on
            parts.append(f"{where}: this server does not support this field (it would be ignored, so it is refused)")
        else:
            parts.append(f"{where}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, first_param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return error_response(400, message, param)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path}: no such route"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def _on_value_error(request: Request, exc: ValueError) -> JSONResponse:
    message = str(exc) or type(exc).__name__
    return error_response(400, message, value_error_param(message))


class CatchAllMiddleware:
    """Turns an unexpected exception into a 500 response, and stops it there.

    Starlette's own handler for ``Exception`` sends the 500 but then re-raises, and uvicorn
    answers a raised exception by closing the connection, so a keep-alive client would
    find its *next* request dropped. Past the start of a response (a stream), nothing
    more can be sent; the stream generators report their errors as events instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not started:
                await error_response(500, f"internal error: {type(exc).__name__}: {exc}")(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise to an OpenAI-shaped response."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_middleware(CatchAllMiddleware)
