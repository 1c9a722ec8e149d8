"""One serving replica from its settings: the paged engine, its loop, metrics, serving and the ASGI app.

`hayabusa serve` builds one under uvicorn; `hayabusa serve --ray` builds one inside each Ray Serve replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from starlette.applications import Starlette

from hayabusa.engine.api import BACKENDS, OPS_OF_BACKEND, default_backend, default_warmup, load_pretrained
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.loading.config import DTYPES
from hayabusa.engine.platform.devices import resolve_device
from hayabusa.engine.server.app import build_app
from hayabusa.engine.server.cli import DEFAULT_MAX_WAITING
from hayabusa.engine.server.engine_loop import EngineLoop
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.serving import CompletionServing


@dataclass(frozen=True)
class ServerSettings:
    model: str  # directory, hub id or random preset
    revision: str | None = None  # hub revision of a hub id
    served_model_name: str | None = None  # the `model` clients send; default: `model`
    backend: str | None = None  # "triton" (the kernels) or "reference" (plain-PyTorch ops); default per device
    device: str | torch.device | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # a config.DTYPES name; default per device
    kv_cache_blocks: int | None = None  # default: from free memory (model_runner's pool sizing, per device)
    block_size: int = 16
    max_num_seqs: int = 256
    max_waiting: int = DEFAULT_MAX_WAITING  # more waiting requests than this: 429

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def load_paged_engine(settings: ServerSettings) -> PagedEngine:
    """The paged engine on the chosen backend: "triton" runs the kernels, "reference" their PyTorch twins."""
    device = resolve_device(settings.device)
    backend = settings.backend or default_backend(device)
    _, config, state_dict, tokenizer = load_pretrained(settings.model, dtype=DTYPES.get(settings.dtype),
                                                       device=device, revision=settings.revision)
    return PagedEngine(config, state_dict, tokenizer, device=device, ops=OPS_OF_BACKEND[backend],
                       kv_cache_blocks=settings.kv_cache_blocks, block_size=settings.block_size,
                       max_num_seqs=settings.max_num_seqs, warmup=default_warmup(device, backend))


def build_server(settings: ServerSettings, engine: PagedEngine | None = None) -> Starlette:
    """The ASGI app of one replica (its lifespan starts the engine loop). `engine`: reuse a loaded one."""
    engine = engine or load_paged_engine(settings)
    metrics = ServerMetrics(engine)
    loop = EngineLoop(engine, max_waiting=settings.max_waiting, observer=metrics)
    serving = CompletionServing(loop, engine.tokenizer, model_name=settings.model_name,
                                max_model_len=engine.config.max_position_embeddings, metrics=metrics)
    return build_app(serving, loop, metrics)
