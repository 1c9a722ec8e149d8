"""hayabusa: fast inference for GPT-NeoX-Japanese 2.7B.

hayabusa.kernels (Triton kernels), hayabusa.engine (loading, the reference model, the paged engine, the `Engine`
API and the CLI), hayabusa.tokenizer, hayabusa.bench. `python -m hayabusa` is the `hayabusa` command.

This is the top of the installed package. It lives in engine/_package_root/ because the repository's top level
holds only the area folders; pyproject.toml maps it to `hayabusa`, as it maps kernels/ to `hayabusa.kernels`.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed metadata on demand: importing hayabusa stays free
        from importlib.metadata import version

        return version("hayabusa")
    raise AttributeError(f"module 'hayabusa' has no attribute {name!r}")
