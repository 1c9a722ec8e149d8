"""One model spec for every command: a directory, a random preset or a Hub id; offline, a Hub id fails in seconds
with the `hf download` command that the installed huggingface_hub really ships. No test here reaches the network."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

from hayabusa.engine.loading import random_models
from hayabusa.engine.loading.checkpoint_writer import write_random_checkpoint
from hayabusa.engine.loading.config import PRESETS, load_config
from hayabusa.engine.loading.model_source import resolve_model_dir
from hayabusa.engine.loading.weights import load_weights
from hayabusa.tokenizer import hub
from hayabusa.tokenizer.hub import ModelNotFoundError, model_snapshot, tokenizer_snapshot
from hayabusa.tokenizer.vocab import RANDOM_PRESETS, VENDORED_DIR, resolve_vocab_files

REPO = "abeja/gpt-neox-japanese-2.7b"
MICRO = PRESETS["tiny"].with_overrides(vocab_size=96, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                       bos_token_id=95, eos_token_id=95)


def resolve_tokenizer_dir(spec, revision=None) -> Path:
    """The directory Tokenizer.from_pretrained(spec) reads vocab.txt and emoji.json from."""
    vocab_file, emoji_file = resolve_vocab_files(spec, revision)
    assert vocab_file.parent == emoji_file.parent
    return vocab_file.parent


@pytest.fixture
def no_hub(monkeypatch):
    """Any question to the Hub fails the test."""
    def asked(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(hub, "hub_unreachable_reason", asked)
    monkeypatch.setattr(hub, "snapshot_download", asked)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_a_local_directory_is_used_as_it_is(tmp_path, no_hub):
    assert resolve_model_dir(tmp_path) == tmp_path and resolve_tokenizer_dir(str(tmp_path)) == tmp_path
    (tmp_path / "file").write_text("x")
    for resolve in (resolve_model_dir, resolve_tokenizer_dir):
        with pytest.raises(ModelNotFoundError, match="is a file"):
            resolve(str(tmp_path / "file"))


@pytest.mark.parametrize("name", ["tinny", "/no/such/dir", "./models/x", "not an id!"])
def test_a_name_that_is_nothing_fails_without_asking_the_hub(name, no_hub):
    for resolve in (resolve_model_dir, resolve_tokenizer_dir):
        with pytest.raises(ModelNotFoundError, match="not a local directory, a random preset .* or a Hub repo id"):
            resolve(name)


def test_the_tokenizer_knows_every_random_preset() -> None:
    assert RANDOM_PRESETS == tuple(PRESETS)  # it names them without the engine (and in errors in the same order)


def test_a_preset_is_a_random_checkpoint_and_the_vendored_vocabulary(no_hub, monkeypatch):
    model_dir = resolve_model_dir("tiny")
    assert load_config(model_dir) == PRESETS["tiny"]
    assert (model_dir / "vocab.txt").read_bytes() == (VENDORED_DIR / "vocab.txt").read_bytes()
    # The tokenizer of a preset needs no checkpoint: `tokenize --model 2.7b` must not write 5 GB first.
    monkeypatch.setattr(random_models, "random_preset_dir", lambda *args, **kwargs: pytest.fail("wrote a checkpoint"))
    assert resolve_tokenizer_dir("2.7b") == VENDORED_DIR


def test_an_uncached_hub_id_offline_names_the_hf_download_command(offline):
    with pytest.raises(ModelNotFoundError) as model_error:
        model_snapshot(REPO)
    message = str(model_error.value)
    assert f"could not fetch Hub repo '{REPO}'" in message and "HF_HUB_OFFLINE is set" in message
    assert f'hf download {REPO} --include "config.json"' in message and "pytorch_model.bin" in message
    recipe = f"(?s)HF_HUB_OFFLINE is set.*\n  hf download {REPO} vocab.txt emoji.json --local-dir DIR\n"
    with pytest.raises(ModelNotFoundError, match=recipe):
        tokenizer_snapshot(REPO)
    with pytest.raises(ModelNotFoundError, match=f"hf download {REPO} --revision v2 vocab.txt"):
        tokenizer_snapshot(REPO, revision="v2")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_cached_hub_snapshot_is_found_offline(offline, fmt):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--abeja--gpt-neox-japanese-2.7b"
    write_random_checkpoint(repo / "snapshots" / commit, MICRO, fmt=fmt, dtype=torch.float32)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    resolved = resolve_model_dir(REPO)
    assert resolved == repo / "snapshots" / commit
    state_dict = load_weights(resolved, load_config(resolved), dtype=torch.float32)
    assert state_dict["gpt_neox_japanese.layers.0.attention.query_key_value.weight"].shape == (96, 32)
    assert resolve_tokenizer_dir(REPO) == resolved


@pytest.fixture
def silent_endpoint(monkeypatch):
    """A Hub endpoint that accepts connections and never answers (what a firewall that drops packets looks like to
    the first request), probed with a short timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub, "HUB_PROBE_SECONDS", 0.3)
    yield
    server.close()


def test_an_unreachable_hub_is_asked_once_then_only_the_cache_is_used(silent_endpoint, monkeypatch, tmp_path):
    """Before: huggingface_hub retried each request 5 times with backoff (~25 s) before failing."""
    calls = []
    snapshot_download = hub.snapshot_download

    def recorded(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        return snapshot_download(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recorded)
    with pytest.raises(ModelNotFoundError, match=r"(?s)did not answer within 0.3 s.*\n  hf download"):
        model_snapshot(REPO, cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"did not answer within 0.3 s"):
        tokenizer_snapshot(REPO, cache_dir=tmp_path)
    assert calls and all(calls)  # every look-up went to the cache alone


def test_a_refused_connection_counts_as_unreachable(monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert re.match(rf"http://127.0.0.1:{port} is unreachable: \w+", hub.hub_unreachable_reason())


def hf_commands(message: str) -> list[list[str]]:
    return [shlex.split(line.strip())[1:] for line in message.splitlines() if line.strip().startswith("hf download")]


def test_the_download_commands_parse_with_the_installed_hf_cli(offline, tmp_path):
    """The recipes are run through the `hf` that huggingface_hub installs (offline: a usage error would show as
    exit status 2 and "No such option"; a well-formed command fails only on the network)."""
    messages = []
    for fetch in (model_snapshot, tokenizer_snapshot):
        with pytest.raises(ModelNotFoundError) as error:
            fetch(REPO, revision="main")
        messages.append(str(error.value))
    commands = [command for message in messages for command in hf_commands(message)]
    assert len(commands) == 2
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    assert hf, "huggingface_hub installs the `hf` command"
    for command in commands:
        command = [tmp_path / "dl" if arg == "DIR" else arg for arg in command]
        result = subprocess.run([hf, *map(str, command)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
        output = result.stdout + result.stderr
        assert result.returncode != 2 and "No such option" not in output, output
        assert "offline" in output, output


def test_no_message_or_doc_names_the_retired_huggingface_cli():
    root = Path(__file__).resolve().parents[2]
    for path in [root / "README.md", *root.glob("engine/*.py"), *root.glob("tokenizer/*.py"), *root.glob("bench/*.py")]:
        assert "huggingface-cli" not in path.read_text(encoding="utf-8"), path
