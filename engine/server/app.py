"""The ASGI app: routes only. The work is in serving.py; the engine runs in engine_loop.py's thread, which the
app's lifespan starts and stops (under uvicorn and in a Ray Serve replica alike)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hayabusa.engine.server.engine_loop import EngineLoop
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.protocol import APIError, CompletionResponse
from hayabusa.engine.server.serving import CompletionServing

CHAT_NOT_SUPPORTED = ("this is a base model with no chat template, so there is no /v1/chat/completions; "
                      "send the text to continue to /v1/completions")


def build_app(serving: CompletionServing, loop: EngineLoop, metrics: ServerMetrics) -> Starlette:
    def error_response(err: Exception) -> JSONResponse:
        error = serving.error(err)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def completions(request: Request) -> Response:
        async def wait_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            body = await request.body()
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=499)
        try:
            result = await serving.create_completion(body, wait_disconnect)
        except Exception as err:
            return error_response(err)
        if isinstance(result, CompletionResponse):
            return Response(result.model_dump_json(), media_type="application/json")
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(request: Request) -> Response:
        return error_response(APIError(404, CHAT_NOT_SUPPORTED, code="not_found"))

    async def models(request: Request) -> Response:
        return Response(serving.models().model_dump_json(), media_type="application/json")

    async def health(request: Request) -> Response:
        if not loop.is_alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Unknown paths and methods answer in OpenAI's error shape too."""
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
