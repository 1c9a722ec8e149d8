"""The `hayabusa` command end to end on a tiny random checkpoint, in process and through the console script."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hayabusa.engine.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["init-random", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    return out


def test_init_random_writes_the_real_config_keys(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_neox_japanese"
    assert {"rotary_pct", "rotary_emb_base"} <= set(config)
    assert (tiny_dir / "vocab.txt").is_file() and (tiny_dir / "emoji.json").is_file()


def test_generate_streams_text_and_is_repeatable(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "12", "--ignore-eos"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.endswith("\n") and len(first.strip()) > 0


def test_generate_reports_bad_input_without_a_traceback(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_dir), "猫", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert "temperature must be >= 0" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tiny_dir / "missing"), "猫"]) == 1
    assert "missing" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    exe = shutil.which("hayabusa")
    assert exe is not None, "the hayabusa console script is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "tokenize", "init-random", "verify", "bench"):
        assert command in result.stdout
