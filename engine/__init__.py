"""hayabusa.engine: config and weight loading, the reference model, the paged engine and the `Engine` API.

The public names import lazily, so `import hayabusa.engine.loading.config` stays cheap and free of cycles.
"""

from typing import Any

_EXPORTS = {
    "Engine": "hayabusa.engine.api",
    "SamplingParams": "hayabusa.engine.sampling_params",
    "GenerationOutput": "hayabusa.engine.outputs",
    "ModelConfig": "hayabusa.engine.loading.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hayabusa.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
