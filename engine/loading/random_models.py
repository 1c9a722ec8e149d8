"""Random-weight checkpoints for the presets, written once into a cache directory and reused.

`--model tiny` (or small, 2.7b) lets anyone run the whole pipeline with no download: the real tensor names,
shapes, config keys and tokenizer, random values. The text such a model writes is meaningless by design.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from hayabusa.engine.loading.checkpoint_writer import write_random_checkpoint
from hayabusa.engine.loading.config import PRESETS, preset

CACHE_VERSION = 1  # bump when the writer's output changes


def cache_root() -> Path:
    root = os.environ.get("HAYABUSA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "hayabusa"


def is_random_preset(name_or_path: str) -> bool:
    """A preset name that is not also a local directory."""
    return name_or_path in PRESETS and not Path(name_or_path).is_dir()


def random_preset_dir(name: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """The cached checkpoint of preset `name`, written on first use (atomically: a crash leaves no half directory)."""
    config = preset(name)
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / f"random-{name}-{dtype_name}-seed{seed}-v{CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_random_checkpoint(staging, config, dtype=dtype, seed=seed)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
