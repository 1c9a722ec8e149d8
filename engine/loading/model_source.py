"""What `--model` (and `from_pretrained`) names, resolved the same way by every command and API:

  1. a local directory: used as it is;
  2. a random preset (tiny, small, 2.7b) that is not also a directory: a random-weight checkpoint of that shape,
     written once into $HAYABUSA_CACHE (default ~/.cache/hayabusa); its tokenizer is the vendored vocabulary;
  3. a Hub repo id 'owner/name': fetched once into the Hugging Face cache (tokenizer/hub.py; offline, the cache only).
Anything else fails at once, without asking the Hub. (`Tokenizer.from_pretrained` resolves names the same way for
just the tokenizer's files, in the tokenizer package.)

The Hub client (huggingface_hub) loads when a name is resolved: every command's parser adds --model from here, and
`hayabusa COMMAND --help` should not wait for it.
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
    from hayabusa.tokenizer.hub import local_dir_or_name, model_snapshot  # huggingface_hub, on demand

    local, name = local_dir_or_name(spec, PRESETS)
    if local is not None:
        return local
    if name in PRESETS:
        from hayabusa.engine.loading.random_models import (
            random_preset_dir,  # it imports the checkpoint writer, which imports the loader
        )

        return random_preset_dir(name)
    return model_snapshot(name, revision)
