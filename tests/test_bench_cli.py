"""`hayabusa bench` as a newcomer meets it: the busy-machine warning said once per condition."""

from pathlib import Path

import pytest
import torch

from hayabusa.bench import cli, suite
from hayabusa.bench.runners import BenchRunner, GenerateResult
from hayabusa.engine.machine_load import MachineLoad

FAST = ["--model", "tiny", "--device", "cpu", "--sizes", "smoke", "--scenarios", "load,decode",
        "--engines", "hayabusa-reference,transformers-eager"]


class InstantRunner(BenchRunner):
    def __init__(self, name: str) -> None:
        super().__init__(Path("."), torch.float32, torch.device("cpu"))
        self.name = name

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def generate(self, prompts, gen_lens):
        return GenerateResult(sum(gen_lens), decode_s=1e-3 * (max(gen_lens) - 1))


@pytest.fixture
def instant_engines(monkeypatch):
    """The suite's engines answer at once: these tests are about what the command says and writes."""
    monkeypatch.setattr(suite, "make_runner", lambda name, *args: InstantRunner(name))


def test_a_busy_machine_is_warned_about_once_per_condition(monkeypatch, tmp_path, capsys, instant_engines):
    busy = MachineLoad(cpus=2, loadavg_1m=3.1, other_busy_cpus=1.5,
                       busiest_processes=[{"pid": 7, "cpu_pct": 150, "command": "make -j2"}])
    monkeypatch.setattr(suite, "measure_machine_load", lambda: busy)
    assert cli.main([*FAST, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("hayabusa bench: warning: ")]
    assert "warning" not in out and "load load" not in err
    assert warnings == [
        "hayabusa bench: warning: the machine was busy when the run started (load average 3.1 on 2 CPUs, other "
        "processes using 1.5 CPUs; busiest: make -j2 (150%)): its timings are noisy",
        # 2 engines x (load + decode batch 1 and 4)
        "hayabusa bench: warning: other processes used at least half the 2 CPUs just before 6 of 6 cases (most: 1.5 "
        "CPUs before hayabusa-reference load; busiest: make -j2 (150%)): those timings are noisy (see the "
        "\"others' CPUs\" column of results.md)"]
    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert markdown.count("- **Warning**: ") == 2
    assert "| hayabusa-reference | 1 | 16 | 1.00 |" in markdown and markdown.count(" | 1.50 |") == 6


def test_the_runs_own_load_is_no_warning(monkeypatch, tmp_path, capsys, instant_engines):
    """Quiet before the run; then the benchmark's own threads lift the load average (2.2 on 2 CPUs) while other
    processes use nothing: no warning (it used to warn before every case)."""
    loads = iter([MachineLoad(2, 0.4, 0.0, [])] + [MachineLoad(2, 2.2, 0.0, [])] * 10)
    monkeypatch.setattr(suite, "measure_machine_load", lambda: next(loads))
    assert cli.main([*FAST, "--out", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "**Warning**" not in (tmp_path / "results.md").read_text(encoding="utf-8")
