"""The Hub client of hayabusa: a model's files fetched from the Hugging Face Hub (only what hayabusa reads: the
tokenizer's two, `tokenizer_snapshot`, or everything the engine loads, `model_snapshot`), or found in the Hub cache;
and what a model name means (`local_dir_or_name`), the same for every command and API. It sits in the tokenizer
package, the lowest that fetches files (Tokenizer.from_pretrained takes a Hub id); the engine's loader uses it too.

Before any download the Hub is asked once, with a short timeout, whether it answers at all: without a route to it
huggingface_hub would retry each request for half a minute. When it does not answer (or HF_HUB_OFFLINE is set),
only the cache is used, and a repo that is not cached fails at once with the `hf download` command that gets it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session

# What hayabusa reads from a checkpoint; nothing else is downloaded.
TOKENIZER_FILES = ["vocab.txt", "emoji.json"]
CONFIG_AND_TOKENIZER_FILES = ["config.json", *TOKENIZER_FILES]
SAFETENSORS_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
HUB_PROBE_SECONDS = 5.0  # how long the Hub gets to answer one request before hayabusa works from the cache

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor a Hub repo whose files could be fetched or found in the cache."""


def is_repo_id(name: str) -> bool:
    """'owner/name', as the Hub spells model repos."""
    return bool(_REPO_ID.match(name))


def hub_unreachable_reason() -> str | None:
    """None when the Hub endpoint answers an HTTP request within HUB_PROBE_SECONDS (any status), else why not.

    The request runs in a daemon thread, so a slow name lookup or a dropped connection cannot hold the caller
    longer than that; it goes through huggingface_hub's own session (its proxies, its endpoint)."""
    timeout = HUB_PROBE_SECONDS
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    answered: list[BaseException | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=2 * timeout)  # the join below times out first
            answered.append(None)
        except Exception as err:  # httpx or requests errors, depending on the huggingface_hub version
            answered.append(err)

    thread = threading.Thread(target=probe, name="hayabusa-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answered:
        return f"{constants.ENDPOINT} did not answer within {timeout:g} s"
    if answered[0] is not None:
        return f"{constants.ENDPOINT} is unreachable: {type(answered[0]).__name__}: {answered[0]}"
    return None


def model_snapshot(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """The snapshot directory of Hub repo `repo_id` holding config.json, the tokenizer files and the weights
    (safetensors, else .bin), downloaded once into the Hugging Face cache and reused offline."""
    offline = hub_unreachable_reason()
    try:
        snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *SAFETENSORS_FILES],
                             offline)
        if not _has_weights(snapshot):  # a repo with only PyTorch .bin weights
            snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *BIN_FILES], offline)
    except ModelNotFoundError:
        raise
    except OSError as first_error:  # not (fully) cached, or the Hub failed: all OSError in huggingface_hub
        try:  # offline with only the .bin weights in the cache
            snapshot = _snapshot(repo_id, revision, cache_dir, [*CONFIG_AND_TOKENIZER_FILES, *BIN_FILES], offline)
        except OSError:
            raise ModelNotFoundError(_model_download_hint(repo_id, revision, offline or _first_line(first_error))) \
                from None
    if not (snapshot / "config.json").is_file() or not _has_weights(snapshot):
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} (snapshot {snapshot}) has no config.json or no weights "
            f"({', '.join(SAFETENSORS_FILES + BIN_FILES)}); is it a GPT-NeoX-Japanese checkpoint?"
        )
    return snapshot


def tokenizer_snapshot(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """The snapshot directory of Hub repo `repo_id` holding just vocab.txt and emoji.json."""
    offline = hub_unreachable_reason()
    try:
        snapshot = _snapshot(repo_id, revision, cache_dir, TOKENIZER_FILES, offline)
        if all((snapshot / name).is_file() for name in TOKENIZER_FILES):
            return snapshot
        reason = "the repo has no vocab.txt or emoji.json"
    except ModelNotFoundError:
        raise
    except OSError as err:
        reason = offline or _first_line(err)
    revision_option = f" --revision {revision}" if revision else ""
    raise ModelNotFoundError(
        f"could not get the tokenizer files of Hub repo {repo_id!r} ({reason}). Download them where the Hub is "
        f"reachable:\n  hf download {repo_id}{revision_option} {' '.join(TOKENIZER_FILES)} --local-dir DIR\n"
        f"then pass DIR instead (without --local-dir they land in the Hugging Face cache, found offline)"
    )


def _has_weights(model_dir: Path) -> bool:
    return any(next(model_dir.glob(pattern), None) is not None for pattern in SAFETENSORS_FILES + BIN_FILES)


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, allow_patterns: list[str],
              offline: str | None) -> Path:
    """The cached snapshot of `repo_id` holding the files matching `allow_patterns`: downloading what is missing,
    or from the cache alone when `offline` (a reason) is set."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                      local_files_only=offline is not None))
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


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _model_download_hint(repo_id: str, revision: str | None, reason: str) -> str:
    at_revision, revision_option = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    includes = " ".join(f'--include "{pattern}"' for pattern in CONFIG_AND_TOKENIZER_FILES + SAFETENSORS_FILES)
    bin_includes = " ".join(f'--include "{pattern}"' for pattern in BIN_FILES)
    return (
        f"could not fetch Hub repo {repo_id!r}{at_revision}, and its files are not in the Hugging Face cache "
        f"({reason})\n"
        f"hayabusa needs {', '.join(CONFIG_AND_TOKENIZER_FILES)} and the weights (model.safetensors or "
        f"pytorch_model.bin, or their shards and index). Download them where the Hub is reachable:\n"
        f"  hf download {repo_id}{revision_option} {includes} --local-dir DIR\n"
        f"adding {bin_includes} if the repo has no safetensors weights, then pass DIR as the model. Without "
        f"--local-dir the files land in the Hugging Face cache, where hayabusa finds them offline."
    )


def local_dir_or_name(spec: str | os.PathLike, presets: Collection[str]) -> tuple[Path | None, str]:
    """(the directory, spec) for a local directory, else (None, spec) for a random preset (one of `presets`, which
    hayabusa writes itself) or a Hub repo id; anything else fails at once, without asking the Hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, str(spec)
    if path.exists():
        raise ModelNotFoundError(f"model {str(spec)!r} is a file; give the directory that holds config.json")
    name = str(spec)
    if name not in presets and not is_repo_id(name):
        raise ModelNotFoundError(f"model {name!r} is not a local directory, a random preset ({', '.join(presets)}) "
                                 f"or a Hub repo id of the form 'owner/name' (e.g. 'abeja/gpt-neox-japanese-2.7b')")
    return None, name
