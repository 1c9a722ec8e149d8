"""bench/gpu_first_light.sh on a CPU: it parses, plans its stages within the 8-minute budget, and without a GPU
stops at once with a message that says so (the GPU run itself needs the GPU)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_first_light.sh"
STAGES = ["install", "checkpoint", "kernel-tests", "memcheck-small", "verify-fp16", "verify-bf16", "bench"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_dry_run_plans_every_stage_cheapest_first_within_eight_minutes():
    done = run("--dry-run")
    assert done.returncode == 0, done.stderr
    planned = re.findall(r"^  (\S+)\s+budget\s+(\d+)s, timeout\s+(\d+)s: (.*)$", done.stdout, re.MULTILINE)
    assert [name for name, *_ in planned] == STAGES
    assert sum(int(budget) for _, budget, _, _ in planned) <= 480
    commands = {name: command for name, _, _, command in planned}
    assert "pip install --no-deps --no-build-isolation" in commands["install"]
    assert "HAYABUSA_KERNEL_SHAPES=small" in commands["memcheck-small"] and "memcheck" in commands["memcheck-small"]
    assert "--dtype float16" in commands["verify-fp16"] and "--dtype bfloat16" in commands["verify-bf16"]
    assert "--sizes gpu" in commands["bench"] and "transformers-compile" in commands["bench"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_without_a_gpu_it_fails_fast_and_says_why():
    done = run(timeout=30)
    assert done.returncode == 1
    assert "FAILED: no NVIDIA GPU visible" in done.stderr and "--cpu-smoke" in done.stderr
    assert "==== install" not in done.stdout  # nothing ran before the check


def test_unknown_options_are_refused():
    done = run("--fast")
    assert done.returncode == 2 and "usage:" in done.stderr
