"""What a `hayabusa bench` run survives and how it reports as it goes: figures appended to --jsonl as measured, a
runner that cannot be built or a launch counter that breaks costing only their own part, torch.compile's recompile
setting under either of its names, the per-kernel table as a scenario of its own, the case overrides, and runs
measured in separate processes merged into one results triple."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hayabusa.bench import cli, merge_results, runners, suite
from hayabusa.bench.runners import BenchRunner, GenerateResult, TransformersRunner, raise_recompile_limit
from hayabusa.bench.workloads import SIZES
from hayabusa.engine.loading.config import PRESETS


class InstantRunner(BenchRunner):
    def __init__(self, name: str) -> None:
        super().__init__(Path("."), torch.float32, torch.device("cpu"))
        self.name, self.loads = name, 0

    def load(self) -> None:
        self.loads += 1

    def unload(self) -> None:
        pass

    def generate(self, prompts, gen_lens):
        return GenerateResult(sum(gen_lens), decode_s=1e-3 * (max(gen_lens) - 1))


def settings(scenarios, engines, jsonl=None):
    return suite.SuiteSettings(model="tiny", model_dir=Path("."), preset="tiny", config=PRESETS["tiny"],
                               device=torch.device("cpu"), dtype=torch.float32, sizes=SIZES["smoke"],
                               scenarios=scenarios, engines=engines, engines_requested=True, jsonl=jsonl)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_figure_skip_and_failure_is_appended_to_the_jsonl_as_it_happens(monkeypatch, tmp_path):
    def build(name, *args):
        if name == "transformers-eager":
            raise AttributeError("module 'torch._dynamo.config' has no attribute 'recompile_limit'")
        return InstantRunner(name)

    monkeypatch.setattr(suite, "make_runner", build)
    jsonl = tmp_path / "figures.jsonl"
    result = suite.run_suite(settings(("decode",), ("hayabusa-reference", "transformers-eager"), jsonl))
    # the runner that could not be built is skipped with its reason; the other engine's figures stand
    assert result.skipped == [{"engine": "transformers-eager", "scenario": "all", "reason": (
        "its runner could not be built here: AttributeError: module 'torch._dynamo.config' has no attribute "
        "'recompile_limit'")}]
    assert [(r.engine, r.batch) for r in result.records] == [("hayabusa-reference", 1), ("hayabusa-reference", 4)]
    events = lines(jsonl)
    assert [e["event"] for e in events] == ["run", "record", "record", "skipped"]
    assert events[0]["roofline"]["copy_gb_per_s"] > 0 and events[0]["engines"] == list(result.settings.engines)
    assert events[1] == {"event": "record", **result.records[0].as_dict()}  # with the case's threads and load
    assert events[1]["extra"]["torch_threads"] >= 1 and events[3]["engine"] == "transformers-eager"


def test_the_kernel_table_is_a_scenario_of_its_own(monkeypatch):
    built = {}
    monkeypatch.setattr(suite, "make_runner", lambda name, *args: built.setdefault(name, InstantRunner(name)))
    result = suite.run_suite(settings(("kernels",), ("hayabusa", "hayabusa-reference")))
    assert result.records == [] and set(built) == {"hayabusa"}  # no case to run: the other engine is not built
    assert built["hayabusa"].loads == 1  # loaded for the table alone
    (skip,) = result.skipped  # on a CPU there are no device kernels to time
    assert (skip["engine"], skip["scenario"]) == ("hayabusa", "kernels") and "CUDA only" in skip["reason"]
    decode_only = suite.run_suite(settings(("decode",), ("hayabusa",)))
    assert decode_only.skipped == [] and len(decode_only.records) == 2  # decode no longer profiles on its own


def test_a_broken_launch_counter_costs_only_the_counts(monkeypatch):
    monkeypatch.setitem(sys.modules, "hayabusa.engine.model.launches", None)  # its import fails, as on another Triton
    counts = suite.launch_counts(settings(("decode",), ("hayabusa-reference",)))
    assert counts == {"unavailable": "the launch counter failed here: ModuleNotFoundError: import of "
                                     "hayabusa.engine.model.launches halted; None in sys.modules"}


def test_the_bench_does_not_import_the_launch_counter_until_it_counts():
    code = "import sys, hayabusa.bench.suite; print('hayabusa.kernels.launch_count' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("names, raised", [(("recompile_limit", "cache_size_limit"), "recompile_limit"),
                                           (("cache_size_limit",), "cache_size_limit"), ((), None)])
def test_the_recompile_limit_is_raised_under_whichever_name_this_torch_has(monkeypatch, names, raised):
    config = SimpleNamespace(**{name: 8 for name in names})
    monkeypatch.setattr(torch._dynamo, "config", config)
    assert raise_recompile_limit(runners.RECOMPILE_LIMIT) == raised
    assert vars(config) == {name: runners.RECOMPILE_LIMIT if name == raised else 8 for name in names}
    # the compiled runner builds under each (an AttributeError here used to end the whole bench)
    TransformersRunner("transformers-compile", True, Path("."), torch.float32, torch.device("cpu"), static_batch=1)


@pytest.fixture
def instant_engines(monkeypatch):
    monkeypatch.setattr(suite, "make_runner", lambda name, *args: InstantRunner(name))


def test_case_overrides_pick_the_decode_cases_and_the_jsonl_gets_the_figures(tmp_path, instant_engines):
    jsonl = tmp_path / "deep" / "figures.jsonl"  # its directory is made
    argv = ["--model", "tiny", "--device", "cpu", "--sizes", "smoke", "--scenarios", "decode",
            "--engines", "hayabusa-reference", "--decode-batches", "4", "1", "4", "--long-decode-prompt", "8",
            "--jsonl", str(jsonl), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["sizes"]["decode_batches"] == [4, 1] and results["sizes"]["long_decode_prompt_len"] == 8
    assert [(r["batch"], r["prompt_len"]) for r in results["records"]] == [(4, 16), (1, 16), (1, 8)]
    assert [e["case"] for e in lines(jsonl) if e["event"] == "record"] == ["batch4", "batch1", "batch1-prompt8"]
    assert cli.main([*argv[:-2], "--long-decode-prompt", "0", "--out", str(tmp_path / "no-long")]) == 0
    assert "batch1-prompt8" not in (tmp_path / "no-long" / "results.md").read_text(encoding="utf-8")


def test_the_commit_recorded_is_the_one_the_run_started_from(tmp_path, monkeypatch, instant_engines):
    """Before: read when the results were written, so a checkout committed or edited during a long run was recorded
    instead of the code that ran."""
    origins = iter([("aaaa", "of the checkout"), ("bbbb-dirty", "of the checkout")])
    monkeypatch.setattr(suite.environment, "code_origin", lambda: next(origins))
    argv = ["--model", "tiny", "--device", "cpu", "--sizes", "smoke", "--scenarios", "decode",
            "--engines", "hayabusa-reference", "--decode-batches", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["commit"] == "aaaa"


def test_token_count_overrides_set_the_decode_length_and_the_prefill_prompts(tmp_path, instant_engines):
    argv = ["--model", "tiny", "--device", "cpu", "--sizes", "smoke", "--scenarios", "decode", "prefill",
            "--engines", "hayabusa-reference", "--decode-batches", "1", "--decode-tokens", "7",
            "--prefill-prompts", "12", "5", "12", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["sizes"]["decode_gen_len"] == 7 and results["sizes"]["prefill_prompt_lens"] == [12, 5]
    decode = [r for r in results["records"] if r["scenario"] == "decode"]
    prefill = [r for r in results["records"] if r["scenario"] == "prefill"]
    assert [r["gen_len"] for r in decode] == [7] and [r["prompt_len"] for r in prefill] == [12, 5]


@pytest.mark.parametrize("flags, error", [
    (["--decode-batches", "1", "0"], "--decode-batches must all be >= 1, got 1 0"),
    (["--decode-batches", "8"], "--decode-batches 8: more than the 4 sequences --sizes smoke gives an engine at once"),
    (["--long-decode-prompt", "-1"], "--long-decode-prompt must be >= 0 (0: no long-context case), got -1"),
    (["--decode-tokens", "1"], "--decode-tokens must be >= 2 (a decode step after the first token), got 1"),
    (["--prefill-prompts", "8", "0"], "--prefill-prompts must all be >= 1, got 8 0"),
    (["--decode-tokens", "5000"], "--sizes smoke: decode needs prompt 16 + generated 5000 tokens, more than the "
                                  "model's max_position_embeddings 512; use smaller --sizes, --decode-tokens or "
                                  "--long-decode-prompt"),
    (["--jsonl", "."], "--jsonl . is a directory; give a file to append JSON lines to"),
])
def test_bad_case_overrides_and_jsonl_are_refused_before_the_run(tmp_path, capsys, flags, error):
    argv = ["--model", "tiny", "--device", "cpu", "--sizes", "smoke", "--out", str(tmp_path), *flags]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == f"hayabusa bench: error: {error}\n"


def load(when: str) -> dict:
    return {"cpus": 16, "loadavg_1m": 0.5, "other_busy_cpus": 0.0, "busiest_processes": [], "when": when}


def run_results(engine, records, **header):
    return {"schema_version": 1, "created": "2026-12-24T10:00:00+00:00", "seconds": 10.0,
            "device": "NVIDIA H100 80GB HBM3 (79 GiB, sm_90)", "device_type": "cuda", "dtype": "float16",
            "model": {"source": "/w/model-2.7b", "dir": "/w/model-2.7b", "preset": None, "random_weights": False},
            "sizes": SIZES["gpu"].as_dict(), "engines": [engine], "scenarios": ["decode"],
            "roofline": {"copy_gb_per_s": 3000.0, "matmul_tflops": 700.0, "dtype": "float16", "matmul_size": 8192},
            "skipped": [], "errors": [], "records": records, "launches_per_decode_step": {}, "decode_kernels": [],
            "machine_load": {"start": load(engine), "end": load(engine)}, "torch_threads": 16, "warnings": [],
            "commit": "abc",
            "commit_source": "test", "driver": None, "versions": {"torch": "2.11", "triton": "3.6"}, **header}


def decode(engine, ms):
    return {"engine": engine, "scenario": "decode", "case": "batch1", "batch": 1, "prompt_len": 128, "gen_len": 128,
            "ms_per_token": ms, "ms": ms * 128, "tokens_per_s": 1e3 / ms, "pct_roofline": 50.0,
            "roofline_basis": "bandwidth", "repeats": 3, "samples_ms": [ms * 128] * 3, "warmup_ms": None,
            "extra": {}}


def test_runs_of_separate_processes_merge_into_one_triple_named_by_device_and_date(tmp_path):
    paths = []
    for engine, ms in (("hayabusa", 2.5), ("transformers-eager", 20.0)):
        (tmp_path / engine).mkdir()
        paths.append(tmp_path / engine / "results.json")
        paths[-1].write_text(json.dumps(run_results(engine, [decode(engine, ms)])))
    written = merge_results.write_merged(paths, tmp_path / "out", preset="2.7b")
    assert sorted(p.name for p in written) == ["nvidia-h100-80gb-hbm3-2026-12-24.json",
                                               "nvidia-h100-80gb-hbm3-2026-12-24.md",
                                               "nvidia-h100-80gb-hbm3-2026-12-24.png"]
    merged = json.loads((tmp_path / "out" / "nvidia-h100-80gb-hbm3-2026-12-24.json").read_text())
    assert [r["engine"] for r in merged["records"]] == ["hayabusa", "transformers-eager"]
    assert merged["engines"] == ["hayabusa", "transformers-eager"] and merged["seconds"] == 20.0
    assert merged["machine_load"] == {"start": load("hayabusa"), "end": load("transformers-eager")}
    assert merged["model"]["preset"] == "2.7b" and merged["model"]["random_weights"]
    markdown = (tmp_path / "out" / "nvidia-h100-80gb-hbm3-2026-12-24.md").read_text()
    assert "| hayabusa | – | 1 | 128 | 2.50 |" in markdown and "8.00x" in markdown  # compared with eager
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)


def test_runs_of_different_devices_or_models_are_not_merged():
    one = run_results("hayabusa", [])
    with pytest.raises(ValueError, match="different device"):
        merge_results.merge([one, {**one, "device": "NVIDIA H200 (140 GiB, sm_90)"}])
    with pytest.raises(ValueError, match="different models"):
        merge_results.merge([one, {**one, "model": {**one["model"], "dir": "/elsewhere"}}])
