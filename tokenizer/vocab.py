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
import re
from dataclasses import dataclass
from pathlib import Path

VOCAB_FILE = "vocab.txt"
EMOJI_FILE = "emoji.json"
VENDORED_DIR = Path(__file__).resolve().parent / "vocab"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


def resolve_vocab_files(dir_or_hub_id: str | os.PathLike | None, revision: str | None = None) -> tuple[Path, Path]:
    """(vocab.txt, emoji.json): vendored (None), from a local directory, or downloaded from a Hub model repo."""
    if dir_or_hub_id is None:
        return VENDORED_DIR / VOCAB_FILE, VENDORED_DIR / EMOJI_FILE
    path = Path(dir_or_hub_id).expanduser()
    if path.is_dir():
        return path / VOCAB_FILE, path / EMOJI_FILE
    name = str(dir_or_hub_id)
    if path.exists():
        raise NotADirectoryError(f"{name} is a file; from_pretrained wants the directory holding {VOCAB_FILE} and "
                                 f"{EMOJI_FILE}")
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise FileNotFoundError(f"{name!r} is neither a directory nor a Hugging Face Hub model id")
    return _download_from_hub(name, revision)


def _download_from_hub(repo_id: str, revision: str | None) -> tuple[Path, Path]:
    import huggingface_hub

    files = []
    for filename in (VOCAB_FILE, EMOJI_FILE):
        try:
            files.append(Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)))
        except Exception as err:  # offline, unknown repo, missing file, auth: all end in the same advice
            raise OSError(
                f"could not get {filename} of {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                f"Download {VOCAB_FILE} and {EMOJI_FILE} on a connected machine, e.g. `huggingface-cli download "
                f"{repo_id} {VOCAB_FILE} {EMOJI_FILE} --local-dir DIR`, and pass DIR instead"
            ) from None
    return files[0], files[1]
