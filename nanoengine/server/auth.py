"""The API key check: ``Authorization: Bearer KEY`` on the routes that do work.

It is ASGI middleware rather than a FastAPI dependency so that it runs before anything
reads the body: a client without the key learns nothing (not even that its JSON is
malformed) and costs no parsing. As vLLM, ``/health``, ``/version`` and ``/metrics`` stay
open so that load balancers and Prometheus need no secret.
"""

from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from nanoengine.server.errors import error_body

GUARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """Answers 401 (OpenAI's error shape) to a guarded request without the right key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):  # constant time: the key leaks nothing by timing
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not given else "invalid API key"
        body = json.dumps(error_body(401, f"{message}: send 'Authorization: Bearer <key>'")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith(GUARDED_PREFIXES)
