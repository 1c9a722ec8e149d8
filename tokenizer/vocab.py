"""Reading vocab.txt + emoji.json (the GPT-NeoX-Japanese sub-word vocabulary) and finding them on disk or the Hub.

vocab.txt has one line per id. A line holding commas lists variant spellings that share the id (`慶応,慶應`);
the first spelling is the one decoding writes. emoji.json maps emoji and emoticons to 12 class tokens
(`"emoji"`, in the order replacements are applied) and each class token to its representative (`"emoji_inv"`).
The parsing quirks of transformers' reader are kept on purpose, because they decide the ids:
  - a line is split on commas whenever it holds one, so the line `,` yields two empty spellings and the comma
    character itself is not a vocabulary entry (it is encoded through its byte token);
  - when a spelling appears on two lines, the later line's id wins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

VOCAB_FILE = "vocab.txt"
EMOJI_FILE = "emoji.json"
VENDORED_DIR = Path(__file__).resolve().parent / "vocab"
# hayabusa's random-weight presets (engine.loading.config.PRESETS): their checkpoints carry this vocabulary
RANDOM_PRESETS = ("2.7b", "small", "tiny")


@dataclass(frozen=True)
class Vocabulary:
    spellings: list[list[str]]  # [id] -> every spelling of that id; [0] is the canonical one
    ids: dict[str, int]  # any spelling -> id
    emoji: dict[str, str]  # emoji / emoticon -> class token, in replacement order
    emoji_inv: dict[str, str]  # class token -> representative emoji written by decode

    def __len__(self) -> int:
        return len(self.spellings)

    def require_id(self, token: str) -> int:
        if token not in self.ids:
            raise ValueError(f"vocab.txt has no entry {token!r}, which this tokenizer needs; is it a GPT-NeoX-Japanese "
                             f"vocabulary?")
        return self.ids[token]


def load_vocabulary(vocab_file: str | os.PathLike, emoji_file: str | os.PathLike) -> Vocabulary:
    spellings = _read_vocab_lines(Path(vocab_file))
    ids = {spelling: token_id for token_id, variants in enumerate(spellings) for spelling in variants}
    emoji, emoji_inv = _read_emoji(Path(emoji_file))
    return Vocabulary(spellings, ids, emoji, emoji_inv)


def _read_vocab_lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path} (expected a GPT-NeoX-Japanese {VOCAB_FILE})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); expected a {VOCAB_FILE}") \
            from None
    lines = text.split("\n")  # universal newlines already folded \r\n and \r into \n, as readlines() sees them
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty; expected one vocabulary entry per line")
    return [line.split(",") if "," in line else [line] for line in lines]


def _read_emoji(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"emoji file not found: {path} (expected a GPT-NeoX-Japanese {EMOJI_FILE})")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(table, dict) or not all(isinstance(table.get(key), dict) for key in ("emoji", "emoji_inv")):
        raise ValueError(f"{path} must be a JSON object with the objects 'emoji' and 'emoji_inv'")
    for key in ("emoji", "emoji_inv"):
        for name, value in table[key].items():
            if not name or not isinstance(value, str):
                raise ValueError(f"{path}: '{key}' maps {name!r} to {value!r}; expected a non-empty key and a string")
    return table["emoji"], table["emoji_inv"]


def resolve_vocab_files(model: str | os.PathLike | None, revision: str | None = None) -> tuple[Path, Path]:
    """(vocab.txt, emoji.json): the vendored ones (None), else those of the model `model` names as every hayabusa
    command does (a directory, a random preset, or a Hub repo id of which only these two files are fetched)."""
    if model is None:
        return VENDORED_DIR / VOCAB_FILE, VENDORED_DIR / EMOJI_FILE
    from hayabusa.tokenizer.hub import local_dir_or_name, tokenizer_snapshot  # huggingface_hub, on demand

    local, name = local_dir_or_name(model, RANDOM_PRESETS)
    if local is not None:
        directory = local
    elif name in RANDOM_PRESETS:
        directory = VENDORED_DIR  # what their checkpoints are written with
    else:
        directory = tokenizer_snapshot(name, revision)
    return directory / VOCAB_FILE, directory / EMOJI_FILE
