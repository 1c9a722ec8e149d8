"""What `--model` (and `from_pretrained`) names, resolved the same way by every command and API:

  1. a local directory: used as it is;
  2. a random preset (tiny, small, 2.7b) that is not also a directory: a random-weight checkpoint of that shape,
     written once into $HAYABUSA_CACHE (default ~/.cache/hayabusa); its tokenizer is the vendored vocabulary;
  3. a Hub repo id 'owner/name': fetched once into the Hugging Face cache (see hub.py; offline, the cache only).
Anything else fails at once, without asking the Hub.

The Hub client (hub.py, huggingface_hub) loads when a name is resolved: every command's parser adds --model from
here, and `hayabusa COMMAND --help` should not wait for it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hayabusa.engine.loading.config import PRESETS

MODEL_SOURCE_HELP = ("a model directory, a Hub repo id (abeja/gpt-neox-japanese-2.7b) or a random preset ("
                   + ", ".join(PRESETS) + ": random weights of that shape, written once under $HAYABUSA_CACHE, "
                   "default ~/.cache/hayabusa)")


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True,
                        model_help: str = MODEL_SOURCE_HELP) -> None:
    """--model and --revision, as every command spells them."""
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--revision", default=None,
                        help="Hub revision (branch, tag or commit) of a Hub repo id (default: main)")


def resolve_model_dir(spec: str | os.PathLike, revision: str | None = None) -> Path:
    """A directory holding config.json, the weights and the tokenizer files of the model `spec` names."""
    local, name = _local_or_name(spec)
    if local is not None:
        return local
    if name in PRESETS:
        from hayabusa.engine.loading.random_models import (
            random_preset_dir,  # it imports the checkpoint writer, which imports the loader
        )

        return random_preset_dir(name)
    from hayabusa.engine.loading.hub import model_snapshot

    return model_snapshot(name, revision)


def resolve_tokenizer_dir(spec: str | os.PathLike, revision: str | None = None) -> Path:
    """A directory holding vocab.txt and emoji.json for the model `spec` names; only those two files are fetched."""
    local, name = _local_or_name(spec)
    if local is not None:
        return local
    if name in PRESETS:
        from hayabusa.tokenizer.vocab import VENDORED_DIR  # what random checkpoints copy

        return VENDORED_DIR
    from hayabusa.engine.loading.hub import tokenizer_snapshot

    return tokenizer_snapshot(name, revision)


def _local_or_name(spec: str | os.PathLike) -> tuple[Path | None, str]:
    """(the directory, spec) for a local directory, else (None, spec) for a preset or a repo id; else an error."""
    from hayabusa.engine.loading.hub import ModelNotFoundError, is_repo_id

    path = Path(spec).expanduser()
    if path.is_dir():
        return path, str(spec)
    if path.exists():
        raise ModelNotFoundError(f"model {str(spec)!r} is a file; give the directory that holds config.json")
    name = str(spec)
    if name not in PRESETS and not is_repo_id(name):
        raise ModelNotFoundError(f"model {name!r} is not a local directory, a random preset ({', '.join(PRESETS)}) "
                                 f"or a Hub repo id of the form 'owner/name' (e.g. 'abeja/gpt-neox-japanese-2.7b')")
    return None, name
