"""hayabusa.engine: the `Engine` API (api), how a request generates (sampling_params), what it gets back (outputs) and
the `hayabusa` command (cli); behind them one subpackage per question: loading (a model name to weights on the
device), model (the paged model and its op sets), core (checking requests, scheduling, the step loop), worker (a
step on the device), sample (choosing tokens), decoding (drafts, beams, best_of), oracle (the reference and
`hayabusa verify`), platform (devices, threads, load), server (HTTP and batch jobs). README: where the code is.

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
