"""The ASGI app: routes and the layers in front of them. The work is in serving.py and tokenization.py; the engine
runs in engine_loop.py's thread, which the app's lifespan starts and stops (under uvicorn and in a Ray Serve replica
alike).

Layers, outermost first: CORS (only with allowed origins), the request id and access log, the API key (only with
one), the drain (503 while shutting down), then the routes. Every error, from any of them, is OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hayabusa.engine.server.drain import Drain, DrainMiddleware
from hayabusa.engine.server.engine_loop import EngineLoop
from hayabusa.engine.server.limits import RequestLimits
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.middleware import REQUEST_ID_HEADER, ApiKeyMiddleware, RequestIdMiddleware
from hayabusa.engine.server.protocol import APIError, CompletionResponse, HealthStatus, VersionInfo
from hayabusa.engine.server.serving import CompletionServing
from hayabusa.engine.server.tokenization import TokenizationServing

CHAT_NOT_SUPPORTED = ("this is a base model with no chat template, so there is no /v1/chat/completions; "
                      "send the text to continue to /v1/completions")


def build_app(serving: CompletionServing, tokenization: TokenizationServing, loop: EngineLoop,
              metrics: ServerMetrics, *, limits: RequestLimits, openapi: dict[str, Any], version: str,
              api_key: str | None = None, allowed_origins: tuple[str, ...] = ()) -> Starlette:
    """The app; `app.state.drain` is its way out (shutdown.py runs it on a signal)."""
    drain = Drain(loop)

    def error_response(err: Exception) -> JSONResponse:
        error = serving.error(err)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def json_response(model: Any, status: int = 200) -> Response:
        return Response(model.model_dump_json(), status_code=status, media_type="application/json")

    def with_body(handle: Callable[[bytes], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """A POST route: its body read within --max-request-bytes, every failure as OpenAI's error."""
        async def route(request: Request) -> Response:
            try:
                return await handle(await limits.read_body(request))
            except ClientDisconnect:  # gone while sending the body: nobody to answer
                return Response(status_code=499)
            except Exception as err:
                return error_response(err)

        return route

    async def completions(request: Request) -> Response:
        async def wait_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def complete(body: bytes) -> Response:
            result = await serving.create_completion(body, wait_disconnect)
            if isinstance(result, CompletionResponse):
                return json_response(result)
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        return await with_body(complete)(request)

    async def tokenize(body: bytes) -> Response:
        return json_response(await tokenization.tokenize(body))

    async def detokenize(body: bytes) -> Response:
        return json_response(await tokenization.detokenize(body))

    async def chat_completions(request: Request) -> Response:
        return error_response(APIError(404, CHAT_NOT_SUPPORTED, code="not_found"))

    async def models(request: Request) -> Response:
        return json_response(serving.models())

    async def tokenizer_info(request: Request) -> Response:
        return json_response(tokenization.info())

    async def show_version(request: Request) -> Response:
        return json_response(VersionInfo(version=version))

    async def health(request: Request) -> Response:
        if drain.draining:
            return json_response(HealthStatus(status="draining"), 503)
        if not loop.is_alive:
            return json_response(HealthStatus(status="engine loop stopped"), 503)
        return json_response(HealthStatus(status="ok"))

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Unknown paths and methods answer in OpenAI's error shape too."""
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)  # a 500 naming the exception's type, never a traceback

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    layers = [Middleware(RequestIdMiddleware)]
    if allowed_origins:
        layers.insert(0, Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                                    allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
                                    expose_headers=[REQUEST_ID_HEADER]))
    if api_key is not None:
        layers.append(Middleware(ApiKeyMiddleware, api_key=api_key, refuse=error_response))
    layers.append(Middleware(DrainMiddleware, drain=drain, refuse=error_response))
    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/tokenize", with_body(tokenize), methods=["POST"]),
            Route("/detokenize", with_body(detokenize), methods=["POST"]),
            Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
            Route("/version", show_version, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        middleware=layers,
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.state.drain = drain
    return app
