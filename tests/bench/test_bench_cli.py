"""`hayabusa bench` as a newcomer meets it: --out and optional packages checked before the run, the busy-machine
warning said once per condition, and the commit (or what ran instead) recorded from any install."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hayabusa.bench import cli, environment, report, suite
from hayabusa.bench.runners import BenchRunner, GenerateResult
from hayabusa.engine.platform.machine_load import MachineLoad

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


def test_out_naming_a_file_or_an_uncreatable_directory_fails_before_the_model_is_resolved(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    missing_model = str(tmp_path / "no-such-model")  # reported instead, were the model resolved first
    assert cli.main(["--model", missing_model, "--out", str(a_file), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"hayabusa bench: error: --out {a_file} is a file, not a directory: "
                                       "results.json, results.md and results.png go into a directory\n")
    assert cli.main(["--model", missing_model, "--out", str(a_file / "under"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.startswith(f"hayabusa bench: error: --out {a_file / 'under'}: cannot create")


def test_without_matplotlib_the_run_writes_json_and_md_and_says_how_to_get_the_plot(
        monkeypatch, tmp_path, capsys, instant_engines):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main([*FAST, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    hint = 'results.png will not be drawn; pip install "hayabusa[bench]" (or pip install matplotlib)'
    assert err.count(hint) == 1 and err.index(hint) < err.index("%|")  # before the progress bar
    assert "(no results.png: matplotlib is missing)" in out and "Traceback" not in out + err


def test_a_named_transformers_engine_without_transformers_fails_before_the_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main([*FAST, "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ('hayabusa bench: error: --engines transformers-eager: transformers is not '
                                       'installed; pip install "hayabusa[bench]"\n')
    assert list(tmp_path.iterdir()) == []


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
    assert "| hayabusa-reference | fp32 | 1 | 16 | 1.00 |" in markdown and markdown.count(" | 1.50 |") == 6


def test_the_runs_own_load_is_no_warning(monkeypatch, tmp_path, capsys, instant_engines):
    """Quiet before the run; then the benchmark's own threads lift the load average (2.2 on 2 CPUs) while other
    processes use nothing: no warning (it used to warn before every case)."""
    loads = iter([MachineLoad(2, 0.4, 0.0, [])] + [MachineLoad(2, 2.2, 0.0, [])] * 10)
    monkeypatch.setattr(suite, "measure_machine_load", lambda: next(loads))
    assert cli.main([*FAST, "--out", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "**Warning**" not in (tmp_path / "results.md").read_text(encoding="utf-8")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def checkout_with(path: Path, files: dict[str, str]) -> str:
    """A git checkout at `path` holding `files` in one commit; its HEAD."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "init", "-q")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "files")
    return git(path, "rev-parse", "HEAD")


CODE = {"bench/suite.py": "runs = 1\n", "engine/api.py": "engine = 1\n"}


@pytest.fixture
def installed_copy(tmp_path, monkeypatch):
    """hayabusa's modules copied as pip installs them (site-packages/hayabusa/bench/...), inside an unrelated git
    repository, and not from a VCS URL."""
    checkout_with(tmp_path / "project", {"README": "another project\n"})
    package_root = tmp_path / "project" / "venv" / "site-packages" / "hayabusa"
    for name, text in CODE.items():
        (package_root / name).parent.mkdir(parents=True, exist_ok=True)
        (package_root / name).write_text(text)
    monkeypatch.setattr(environment, "_direct_url", lambda: {"url": "file:///gone", "dir_info": {}})
    return package_root


def test_an_installed_copy_run_elsewhere_records_its_version_and_no_commit(installed_copy, tmp_path):
    commit, source = environment.code_origin(installed_copy, cwd=tmp_path)
    version = environment.package_versions()["hayabusa"]
    assert commit is None  # not the enclosing project's commit
    assert source.startswith(f"no commit known: hayabusa {version} is an installed copy, not run from a git checkout")


def test_an_installed_copy_run_in_its_checkout_records_the_checkout_commit(installed_copy, tmp_path):
    head = checkout_with(tmp_path / "hayabusa", {**CODE, "README.md": "hayabusa\n"})
    commit, source = environment.code_origin(installed_copy, cwd=tmp_path / "hayabusa" / "bench")
    assert commit == head and str(tmp_path / "hayabusa") in source
    (tmp_path / "hayabusa" / "bench" / "suite.py").write_text("runs = 2\n")  # the checkout moved on since
    commit, source = environment.code_origin(installed_copy, cwd=tmp_path / "hayabusa")
    assert commit is None and source.startswith("no commit known: the installed hayabusa")
    assert f"{head}-dirty" in source


def test_a_pip_install_from_git_records_its_commit(installed_copy, tmp_path, monkeypatch):
    url = {"url": "https://github.com/example/hayabusa", "vcs_info": {"vcs": "git", "commit_id": "c0ffee" * 6}}
    monkeypatch.setattr(environment, "_direct_url", lambda: url)
    commit, source = environment.code_origin(installed_copy, cwd=tmp_path)
    assert commit == "c0ffee" * 6 and "https://github.com/example/hayabusa" in source


def test_the_markdown_never_shows_commit_none():
    results = json.loads((Path(__file__).parents[2] / "bench/results/cpu-2.7b-2026-12-01.json").read_text())
    results |= {"commit": None, "commit_source": "no commit known: hayabusa 0.1.0 is an installed copy"}
    header = report.markdown_report(results).split("\n## ")[0]
    assert "None" not in header
    assert "**hayabusa** 0.1.0 (no commit known: hayabusa 0.1.0 is an installed copy)" in header
