"""One serving replica from its settings: the paged engine, its loop, metrics, serving and the ASGI app.

`hayabusa serve` builds one under uvicorn; `hayabusa serve --ray` builds one inside each Ray Serve replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from starlette.applications import Starlette

import hayabusa
from hayabusa.engine.api import BACKENDS, OPS_OF_BACKEND, default_backend, default_warmup, load_pretrained
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.loading.config import DTYPES
from hayabusa.engine.loading.quant_schemes import scheme_named
from hayabusa.engine.platform.devices import resolve_device
from hayabusa.engine.platform.dtypes import AUTO
from hayabusa.engine.server.app import build_app
from hayabusa.engine.server.cli import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_PER_REQUEST, DEFAULT_MAX_WAITING
from hayabusa.engine.server.engine_loop import EngineLoop
from hayabusa.engine.server.limits import RequestLimits
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.openapi import openapi_document
from hayabusa.engine.server.serving import CompletionServing
from hayabusa.engine.server.tokenization import TokenizationServing


@dataclass(frozen=True)
class ServerSettings:
    model: str  # directory, hub id or random preset
    revision: str | None = None  # hub revision of a hub id
    served_model_name: str | None = None  # the `model` clients send; default: `model`
    backend: str | None = None  # "triton" (the kernels) or "reference" (plain-PyTorch ops); default per device
    device: str | torch.device | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # a config.DTYPES name; None or "auto": the device's default (platform.dtypes)
    quantization: str | None = None  # a quant_schemes name (int8, int4, W4A16, ...): quantize while loading
    kv_cache_blocks: int | None = None  # default: from free memory (model_runner's pool sizing, per device)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per engine step; default: the engine's
    max_waiting: int = DEFAULT_MAX_WAITING  # more waiting requests than this: 429
    max_model_len: int | None = None  # prompt + max_tokens per prompt; default: the model's positions
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body: 413
    max_tokens_per_request: int = DEFAULT_MAX_TOKENS_PER_REQUEST  # prompt tokens + sequences x max_tokens
    api_key: str | None = None  # every route but /health, /metrics, /version, /openapi.json needs it as a Bearer token
    allowed_origins: tuple[str, ...] = ()  # CORS: the browser origins allowed ("*": any); none: no CORS headers

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in (None, AUTO, *DTYPES):
            raise ValueError(f"dtype must be one of {', '.join((AUTO, *DTYPES))}, got {self.dtype!r}")
        if self.quantization is not None:
            scheme_named(self.quantization)  # a bad name fails here, before the model loads
        for name in ("max_waiting", "max_request_bytes", "max_tokens_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_key == "":
            raise ValueError("the API key is empty: give a key, or none for a server without one")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def load_paged_engine(settings: ServerSettings) -> PagedEngine:
    """The paged engine on the chosen backend: "triton" runs the kernels, "reference" their PyTorch twins."""
    device = resolve_device(settings.device)
    backend = settings.backend or default_backend(device)
    _, config, state_dict, tokenizer = load_pretrained(settings.model, dtype=DTYPES.get(settings.dtype),
                                                       device=device, revision=settings.revision,
                                                       quantization=settings.quantization)
    return PagedEngine(config, state_dict, tokenizer, device=device, ops=OPS_OF_BACKEND[backend],
                       kv_cache_blocks=settings.kv_cache_blocks, block_size=settings.block_size,
                       max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                       warmup=default_warmup(device, backend))


def request_limits(settings: ServerSettings, engine: PagedEngine) -> RequestLimits:
    positions = engine.config.max_position_embeddings
    max_model_len = settings.max_model_len or positions
    if max_model_len > positions:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's {positions} positions "
                         f"(max_position_embeddings); give at most {positions}")
    return RequestLimits(max_model_len=max_model_len, max_request_bytes=settings.max_request_bytes,
                         max_tokens_per_request=settings.max_tokens_per_request)


def build_server(settings: ServerSettings, engine: PagedEngine | None = None) -> Starlette:
    """The ASGI app of one replica (its lifespan starts the engine loop). `engine`: reuse a loaded one."""
    engine = engine or load_paged_engine(settings)
    limits = request_limits(settings, engine)
    metrics = ServerMetrics(engine)
    loop = EngineLoop(engine, max_waiting=settings.max_waiting, observer=metrics)
    name = settings.model_name
    serving = CompletionServing(loop, engine.tokenizer, model_name=name, limits=limits, metrics=metrics)
    tokenization = TokenizationServing(engine.tokenizer, model_name=name, max_model_len=limits.max_model_len)
    version = hayabusa.__version__
    openapi = openapi_document(model_name=name, vocab_size=engine.config.vocab_size, limits=limits, version=version,
                               api_key=settings.api_key is not None)
    return build_app(serving, tokenization, loop, metrics, limits=limits, openapi=openapi, version=version,
                     api_key=settings.api_key, allowed_origins=settings.allowed_origins)
