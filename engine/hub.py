"""Find a model's files: a local directory as is, or a Hugging Face Hub repo fetched (only what hayabusa reads)."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

# What hayabusa reads from a checkpoint; nothing else is downloaded.
CONFIG_AND_TOKENIZER_FILES = ["config.json", "vocab.txt", "emoji.json"]
SAFETENSORS_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor a Hub repo whose files could be fetched or found in the cache."""


def resolve_model_dir(name_or_path: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """A directory holding config.json and the weights: `name_or_path` itself if it is a directory, else the
    snapshot of the Hub repo `name_or_path` (downloaded once into the Hugging Face cache, then reused offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} is a file; give the directory that holds config.json")
    if not _REPO_ID.match(str(name_or_path)):
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local directory and not a Hub repo id of the form 'owner/name' "
            "(e.g. 'abeja/gpt-neox-japanese-2.7b')"
        )
    repo_id = str(name_or_path)
    try:
        snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *SAFETENSORS_FILES])
        if not _has_weights(snapshot):  # a repo with only PyTorch .bin weights
            snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *BIN_FILES])
    except ModelNotFoundError:
        raise
    except OSError as first_error:  # offline, Hub unreachable, not (fully) cached: all OSError in huggingface_hub
        try:  # offline with only the .bin weights in the cache
            snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *BIN_FILES])
        except OSError:
            raise ModelNotFoundError(_download_hint(repo_id, revision, first_error)) from None
    if not (snapshot / "config.json").is_file() or not _has_weights(snapshot):
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} (snapshot {snapshot}) has no config.json or no weights "
            f"({', '.join(SAFETENSORS_FILES + BIN_FILES)}); is it a GPT-NeoX-Japanese checkpoint?"
        )
    return snapshot


def _has_weights(model_dir: Path) -> bool:
    return any(next(model_dir.glob(pattern), None) is not None for pattern in SAFETENSORS_FILES + BIN_FILES)


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, allow_patterns: list[str]) -> Path:
    """The cached snapshot of `repo_id` holding the files matching `allow_patterns`, downloading what is missing."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} does not exist (or is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None


def _download_hint(repo_id: str, revision: str | None, error: OSError) -> str:
    at_revision, cli_revision = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    reason = (str(error).splitlines() or [""])[0]
    includes = " ".join(f'--include "{pattern}"' for pattern in CONFIG_AND_TOKENIZER_FILES + SAFETENSORS_FILES)
    bin_includes = " ".join(f'--include "{pattern}"' for pattern in BIN_FILES)
    return (
        f"could not fetch Hub repo {repo_id!r}{at_revision}, and its files are not in the Hugging Face cache "
        f"({type(error).__name__}: {reason})\n"
        f"hayabusa needs {', '.join(CONFIG_AND_TOKENIZER_FILES)} and the weights (model.safetensors or "
        f"pytorch_model.bin, or their shards and index). Download them where the Hub is reachable:\n"
        f"  hf download {repo_id}{cli_revision} {includes} --local-dir DIR\n"
        f"adding {bin_includes} if the repo has no safetensors weights "
        f"(`huggingface-cli download` with older huggingface_hub), then pass DIR as the model. Without "
        f"--local-dir the files land in the Hugging Face cache, where hayabusa finds them offline."
    )
