"""The ASGI layers in front of the routes: a request id on every request (echoed, and logged with the outcome),
and the API key check when `--api-key` is set. (CORS is Starlette's, and the drain's is in drain.py.)"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hayabusa.engine.server.protocol import APIError

access_log = logging.getLogger("hayabusa.server.access")

REQUEST_ID_HEADER = "x-request-id"
CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # a client's own id is kept when it is 1-128 visible ASCII characters
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})  # no API key needed (as in vLLM)


class RequestIdMiddleware:
    """Gives each request an id: the client's X-Request-Id when it sent a usable one, else a new one. The response
    carries it back in X-Request-Id, handlers find it in `request.state.request_id`, and the access log line of the
    request names it (method, path, status, seconds)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = sent if CLIENT_REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = "-"
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            access_log.info('%s "%s %s" %s %.3fs request_id=%s', f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], scope["path"], status, time.perf_counter() - started, request_id)


class ApiKeyMiddleware:
    """Every route but OPEN_PATHS needs `Authorization: Bearer KEY`, else 401 in OpenAI's shape. The keys are
    compared as SHA-256 digests with hmac.compare_digest: in constant time, whatever their lengths."""

    def __init__(self, app: ASGIApp, api_key: str, refuse: Callable[[APIError], Response]) -> None:
        if not api_key:
            raise ValueError("the API key is empty")
        self.app = app
        self.refuse = refuse
        self._key_digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (a CORS preflight carries no credentials; the CORS layer outside answers it)
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._problem(Headers(scope=scope).get("authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        refusal = APIError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await self.refuse(refusal)(scope, receive, send)

    def _problem(self, authorization: str | None) -> str | None:
        """Why the header does not authorize the request; None when it does."""
        if authorization is None:
            return "no API key: this server needs the header 'Authorization: Bearer <key>'"
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return "the Authorization header must be 'Bearer <key>'"
        # (Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent)
        if not hmac.compare_digest(hashlib.sha256(key.strip().encode("latin-1")).digest(), self._key_digest):
            return "the API key sent as 'Authorization: Bearer <key>' is not this server's"
        return None
