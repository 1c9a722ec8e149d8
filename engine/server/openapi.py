"""GET /openapi.json: the OpenAPI 3.1 document of one running server, built from the pydantic models the routes
validate with, so it says what the server accepts and answers: every route, every field with its bounds, the
served model's name, token ids bounded by its vocabulary, every error status a route can give (in OpenAI's error
shape), the request id header, and the API key where one is set.

tests/server/test_server_fuzz.py holds the server to it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hayabusa.engine.server.drain import UNDRAINED_PATHS
from hayabusa.engine.server.limits import RequestLimits
from hayabusa.engine.server.middleware import OPEN_PATHS, REQUEST_ID_HEADER
from hayabusa.engine.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ModelList,
    VersionInfo,
)
from hayabusa.engine.server.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

REF = "#/components/schemas/{model}"
JSON = "application/json"
ERROR_WHY = {
    400: "A malformed request, or one past a limit; `param` names the field",
    401: "No API key, or not this server's",
    404: "Another model than the one served",
    413: "The body is larger than --max-request-bytes (refused before it is read whole)",
    429: "More requests wait for the engine than --max-waiting; retry after Retry-After seconds",
    500: "The engine step running the request failed (the server keeps serving)",
    503: "The server is shutting down (draining) and takes no new request",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def _operation(operation_id: str, summary: str, ok: dict[str, Any], errors: tuple[int, ...] = (),
               body: type[BaseModel] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "responses": {"200": ok, **{str(status): _error(status) for status in errors}}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    return operation


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(description: str, model: type[BaseModel]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(model)}}}


def _error(status: int) -> dict[str, Any]:
    response = _json(ERROR_WHY[status], ErrorResponse)
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def _paths() -> dict[str, dict[str, Any]]:
    """Each route with what its handler can answer; the layers in front (API key, drain) are added after."""
    completion_ok = {"description": "The completion; with `stream`, server-sent events: `data: {chunk}` lines (each "
                                    "a CompletionResponse), an error event if the engine fails after the first, then "
                                    "`data: [DONE]`",
                     "content": {JSON: {"schema": _ref(CompletionResponse)},
                                 "text/event-stream": {"schema": {"type": "string"}}}}
    return {
        "/v1/completions": {"post": _operation("createCompletion", "Continue one or more prompts", completion_ok,
                                               (400, 404, 413, 429, 500), CompletionRequest)},
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion",
            "summary": "Not served: a base model has no chat template (always 404; send the text to /v1/completions)",
            "requestBody": {"required": False, "content": {JSON: {"schema": {}}}},
            "responses": {"404": _error(404)}}},
        "/v1/models": {"get": _operation("listModels", "The served model", _json("One model card", ModelList))},
        "/tokenize": {"post": _operation("tokenize", "A text's token ids (vLLM's shape)",
                                         _json("Its tokens", TokenizeResponse), (400, 404, 413), TokenizeRequest)},
        "/detokenize": {"post": _operation("detokenize", "The text of token ids (vLLM's shape)",
                                           _json("The text", DetokenizeResponse), (400, 404, 413),
                                           DetokenizeRequest)},
        "/tokenizer_info": {"get": _operation("tokenizerInfo", "The tokenizer's configuration (vLLM's shape)",
                                              _json("As tokenizer_config.json says", TokenizerInfo))},
        "/version": {"get": _operation("version", "hayabusa's version", _json("The version", VersionInfo))},
        "/health": {"get": {"operationId": "health", "summary": "Whether the server serves",
                            "responses": {"200": _json("Serving", HealthStatus),
                                          "503": _json("Not serving: the engine loop stopped, or draining",
                                                       HealthStatus)}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {JSON: {"schema": {"type": "object"}}}}}}},
    }


def _schemas(model_name: str, vocab_size: int) -> dict[str, Any]:
    _, top = models_json_schema(
        [(CompletionRequest, "validation"), (TokenizeRequest, "validation"), (DetokenizeRequest, "validation"),
         (CompletionResponse, "serialization"), (ModelList, "serialization"), (TokenizeResponse, "serialization"),
         (DetokenizeResponse, "serialization"), (TokenizerInfo, "serialization"), (VersionInfo, "serialization"),
         (HealthStatus, "serialization"), (ErrorResponse, "serialization")], ref_template=REF)
    schemas = top["$defs"]
    completion = schemas["CompletionRequest"]["properties"]
    for name, field in completion.items():  # null asks for a field's default (CompletionRequest._null_means_default)
        if name not in schemas["CompletionRequest"]["required"] and not _accepts_null(field):
            completion[name] = {"anyOf": [field, {"type": "null"}], **_annotations(field)}
    served = {"type": "string", "enum": [model_name]}  # any other name is a 404
    completion["model"] = served
    for request in ("TokenizeRequest", "DetokenizeRequest"):
        schemas[request]["properties"]["model"] = {"anyOf": [served, {"type": "null"}], "default": None}
    _bound_token_ids(schemas, vocab_size)
    return schemas


def _accepts_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(option.get("type") == "null" for option in schema.get("anyOf", ()))


def _annotations(schema: dict[str, Any]) -> dict[str, Any]:
    """What describes a field rather than constrains it: kept outside its anyOf."""
    return {key: schema.pop(key) for key in ("title", "description", "default") if key in schema}


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    """Every TokenId schema (protocol.TOKEN_ID_SCHEMA) gets the vocabulary's bound."""
    if isinstance(node, dict):
        if node.get("title") == "TokenId":
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def openapi_document(*, model_name: str, vocab_size: int, limits: RequestLimits, version: str,
                     api_key: bool) -> dict[str, Any]:
    paths = _paths()
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            if api_key and path not in OPEN_PATHS:
                operation["security"] = [{"apiKey": []}]
                responses["401"] = _error(401)
            if path not in UNDRAINED_PATHS:
                responses["503"] = _error(503)
            operation["parameters"] = [{"name": REQUEST_ID_HEADER, "in": "header", "required": False,
                                        "description": "Your id for the request (1-128 visible ASCII characters; "
                                                       "else the server makes one)", "schema": {"type": "string"}}]
            for response in responses.values():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = {
                    "description": "The request's id (yours, or the server's), as the server logged it",
                    "required": True, "schema": {"type": "string"}}
    components: dict[str, Any] = {"schemas": _schemas(model_name, vocab_size)}
    if api_key:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    description = (f"OpenAI-compatible completions of {model_name}. Limits of this server: a prompt plus max_tokens "
                   f"up to {limits.max_model_len} tokens (--max-model-len), a request body up to "
                   f"{limits.max_request_bytes} bytes (--max-request-bytes), up to {limits.max_tokens_per_request} "
                   f"tokens per request: prompt tokens + n (or best_of, or num_beams) x max_tokens per prompt "
                   f"(--max-tokens-per-request). Errors come as {{\"error\": {{message, type, param, code}}}}.")
    return {"openapi": "3.1.0", "info": {"title": "hayabusa", "version": version, "description": description},
            "paths": paths, "components": components}
