"""bench/gpu_first_light.sh on a CPU: its plan fits the device tool's 540 s in the order the numbers are worth, and
its CPU twin (--cpu-smoke), with one stage made to fail and others made to overrun, keeps the deadline, still runs
the stages that do not need them and leaves its JSON lines, logs and merged results where the device tool returns
them; a run stopped by a signal or whose runner is killed still writes its results."""

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from hayabusa.bench.first_light.plan import STAGE_ORDER

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_first_light.sh"
PLAN_LINE = re.compile(r"^  (\S+)\s+(?:at\s+(\d+) s  budget\s+(\d+) s  needs (\S+): (.*)|not run: (.*))\n"
                       r"(?:      \$ (.*)\n)?", re.MULTILINE)
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def run(*args: str, timeout: float = 60, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"OUT": str(out)} if out else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def planned(stdout: str) -> dict[str, dict]:
    return {m[1]: {"start": int(m[2]) if m[2] else None, "budget": int(m[3]) if m[3] else None, "needs": m[4],
                   "not_run": m[6], "command": m[7]} for m in PLAN_LINE.finditer(stdout)}


def worst_case(stdout: str) -> int:
    return int(re.search(r"^worst case: (\d+) s of the (\d+) s budget", stdout, re.MULTILINE)[1])


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(subprocess.run(["which", "shellcheck"], capture_output=True).returncode != 0,
                    reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_dry_run_plans_every_stage_in_the_order_of_their_worth_within_540_s():
    done = run("--dry-run")
    assert done.returncode == 0, done.stderr
    plan = planned(done.stdout)
    assert tuple(plan) == STAGE_ORDER == (
        "preflight", "install", "checkpoint", "warm-start", "verify-fp16", "hayabusa", "transformers-eager",
        "quantized", "kernel-profile", "kernel-tests", "memcheck", "transformers-compile")
    assert all(stage["budget"] for stage in plan.values())  # every stage has a share on a GPU machine
    assert sum(stage["budget"] for stage in plan.values()) + 15 == worst_case(done.stdout) <= 540
    starts = [stage["start"] for stage in plan.values()]
    assert starts == sorted(starts) and starts[0] == 0
    assert all("preflight" in stage["needs"].split(",") for name, stage in plan.items() if name != "preflight")
    commands = {name: stage["command"] for name, stage in plan.items()}
    assert "pip install --no-deps --no-build-isolation --no-index" in commands["install"]
    assert "verify" in commands["verify-fp16"] and "--dtype float16" in commands["verify-fp16"]
    bench = "-m hayabusa bench --model {work}/model-2.7b --device cuda --sizes gpu --jsonl"
    work = re.search(r"TRITON_CACHE_DIR=(\S+)/triton-cache", done.stdout)[1]  # one cache for every stage
    for name, engines, scenarios in (("hayabusa", "hayabusa", "decode prefill"),
                                     ("transformers-eager", "transformers-eager", "decode prefill"),
                                     ("kernel-profile", "hayabusa", "kernels"),
                                     ("transformers-compile", "transformers-compile", "decode")):
        assert bench.format(work=work) in commands[name]
        assert f"--engines {engines} --scenarios {scenarios}" in commands[name]
    assert "--decode-batches 1 --long-decode-prompt 0" in commands["transformers-compile"]  # one shape to compile
    assert bench.format(work=work) in commands["quantized"]
    assert "--engines hayabusa --scenarios decode --decode-batches 1 --long-decode-prompt 0 --quantization int8 int4" \
        in commands["quantized"]
    assert "hayabusa.bench.start_time" in commands["warm-start"] and "--backend triton" in commands["warm-start"]
    assert "HAYABUSA_KERNEL_SHAPES=full" in commands["kernel-tests"] and "sm90" not in commands["kernel-tests"]
    assert "HAYABUSA_GUARD_ALIGNMENT=both" in commands["kernel-tests"]  # the engine's aligned variants, then the odd
    assert commands["memcheck"].startswith("HAYABUSA_KERNEL_SHAPES=small HAYABUSA_GUARD_ALIGNMENT=aligned "
                                           "PYTORCH_NO_CUDA_MEMORY_CACHING=1 ")
    assert "compute-sanitizer --tool memcheck" in commands["memcheck"]
    assert not Path(work).exists()  # the wrapper's scratch directory is gone, as after every run


def test_a_shorter_budget_keeps_the_first_stages_shares_and_leaves_the_last_ones_what_is_left():
    full, short = planned(run("--dry-run").stdout), run("--dry-run", "--budget", "300")
    plan = planned(short.stdout)
    assert worst_case(short.stdout) <= 300
    assert [plan[name]["budget"] for name in STAGE_ORDER[:5]] == [full[name]["budget"] for name in STAGE_ORDER[:5]]
    assert plan["transformers-compile"]["not_run"] == "no time left in this budget"


def test_unknown_options_and_stages_are_refused():
    done = run("--fast")
    assert done.returncode == 2 and "usage:" in done.stderr
    done = run("--cpu-smoke", "--fail", "no-such-stage")
    assert done.returncode == 2 and "invalid choice: 'no-such-stage'" in done.stderr


def bundle_names(out: Path) -> list[str]:
    with tarfile.open(out / "first_light_logs.tar") as tar:
        return tar.getnames()


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "first_light.jsonl").read_text().splitlines()]


def assert_returnable(out: Path) -> None:
    """What the device tool returns: at most 8 files, each at most 16 MiB, plain names, no folders."""
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 << 20 for f in files)
    assert all(OUT_NAME.match(f.name) for f in files)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_without_a_gpu_it_stops_at_the_preflight_says_why_and_still_writes_its_results(tmp_path):
    done = run(out=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "sees no CUDA device" in done.stdout and "--cpu-smoke" in done.stdout
    stages = {e["stage"]: e for e in events(tmp_path) if e["event"] == "stage"}
    assert stages["preflight"]["status"] == "failed"
    assert {e["reason"] for name, e in stages.items() if name != "preflight"} == {"needs preflight, which failed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "first_light.jsonl", "first_light.log", "first_light.md", "first_light_logs.tar"]
    assert bundle_names(tmp_path) == ["logs/preflight.log"]
    work = Path(re.search(r"work in (\S+)", done.stdout)[1])
    assert not work.exists()


SMOKE_BUDGET = 70


@pytest.fixture(scope="module")
def faulty_smoke(tmp_path_factory):
    """The CPU twin with verify made to fail, the warm start made to overrun (ignoring SIGTERM, leaving a child)
    and transformers eager too, in a 70 s budget; (result, output directory, wall seconds)."""
    out = tmp_path_factory.mktemp("out")
    start = time.monotonic()
    done = run("--cpu-smoke", "--budget", str(SMOKE_BUDGET), "--fail", "verify-fp16", "--overrun", "warm-start",
               "--overrun", "transformers-eager", out=out, timeout=SMOKE_BUDGET + 60)
    return done, out, time.monotonic() - start


def test_the_deadline_holds_and_the_stages_that_do_not_need_the_broken_ones_still_run(faulty_smoke):
    done, out, seconds = faulty_smoke
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds <= SMOKE_BUDGET + 2  # the deadline, and the wrapper's start and cleanup
    stages = {e["stage"]: e for e in events(out) if e["event"] == "stage"}
    assert list(stages) == list(STAGE_ORDER)
    assert {name: e["status"] for name, e in stages.items()} == {
        "preflight": "ok", "install": "ok", "checkpoint": "ok", "warm-start": "timed_out", "verify-fp16": "failed",
        "hayabusa": "ok", "transformers-eager": "timed_out", "quantized": "skipped", "kernel-profile": "skipped",
        "kernel-tests": "skipped",
        "memcheck": "skipped", "transformers-compile": "skipped"}
    warm, eager = stages["warm-start"], stages["transformers-eager"]
    assert warm["seconds"] <= warm["limit_s"] + 1 and warm["reason"] == f"ran past its {warm['limit_s']:.0f} s limit"
    # the last stage that could run was stopped at the deadline, less the 15 s kept for the results
    assert eager["started_s"] + eager["limit_s"] == pytest.approx(SMOKE_BUDGET - 15, abs=1)
    assert stages["verify-fp16"]["reason"] == "exit status 3"
    assert stages["kernel-tests"]["reason"].startswith("no time left")
    # the overrunning stages' children, which outlived their parents' SIGTERM, were killed with their group
    for stage in ("warm-start", "transformers-eager"):
        log = subprocess.run(["tar", "-xOf", str(out / "first_light_logs.tar"), f"logs/{stage}.log"],
                             capture_output=True, text=True, check=True).stdout
        child = int(re.search(r"child pid (\d+)", log)[1])
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()


def test_the_figures_logs_and_merged_results_are_in_out(faulty_smoke):
    _, out, _ = faulty_smoke
    assert_returnable(out)
    found = events(out)
    assert found[0]["event"] == "plan" and found[-1]["event"] == "end"
    kinds = [e["event"] for e in found]
    # hayabusa's figures were appended as measured, before its stage's line
    hayabusa_line = next(i for i, e in enumerate(found) if e.get("stage") == "hayabusa")
    records = [e for e in found[:hayabusa_line] if e["event"] == "record"]
    assert [(r["engine"], r["scenario"], r["batch"]) for r in records] == [
        ("hayabusa-reference", "decode", 1), ("hayabusa-reference", "decode", 4),
        ("hayabusa-reference", "prefill", 1), ("hayabusa-reference", "prefill", 1)]
    assert "run" in kinds[:hayabusa_line]  # the bench's device and roofline
    names = bundle_names(out)
    assert [n for n in names if n.startswith("logs/")] == [f"logs/{s}.log" for s in STAGE_ORDER[:7]]
    assert "hayabusa/bench-hayabusa/results.json" in names
    (merged,) = out.glob("cpu-tiny-*.json")
    results = json.loads(merged.read_text())
    assert results["model"]["preset"] == "tiny" and results["model"]["random_weights"]
    assert {r["engine"] for r in results["records"]} == {"hayabusa-reference"}
    assert merged.with_suffix(".md").exists() and merged.with_suffix(".png").exists()
    summary = (out / "first_light.md").read_text()
    assert "| warm-start | timed_out |" in summary and "| hayabusa | ok |" in summary
    assert "| hayabusa-reference | decode | batch1 |" in summary


def start_wrapper(out: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """The wrapper in the background, once its first stage, made to overrun, is running and has left a child;
    (the wrapper, that child's pid)."""
    wrapper = subprocess.Popen(["bash", str(SCRIPT), "--cpu-smoke", "--overrun", "preflight", *args],
                               env={**os.environ, "OUT": str(out)}, stdout=subprocess.PIPE, text=True)
    deadline, child = time.monotonic() + 60, None
    while child is None:
        assert time.monotonic() < deadline and wrapper.poll() is None
        time.sleep(0.2)
        runner_log = (out / "first_light.log").read_text() if (out / "first_light.log").exists() else ""
        work = re.search(r"work in (\S+)", runner_log)
        stage_log = Path(work[1]) / "logs" / "preflight.log" if work else None
        found = re.search(r"child pid (\d+)", stage_log.read_text()) if stage_log and stage_log.exists() else None
        child = int(found[1]) if found else None
    return wrapper, child


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_sigterm_stops_the_stage_in_flight_skips_the_rest_and_still_writes_the_results(tmp_path):
    wrapper, child = start_wrapper(tmp_path)
    wrapper.send_signal(signal.SIGTERM)
    stdout, _ = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 1
    stages = {e["stage"]: e for e in events(tmp_path) if e["event"] == "stage"}
    assert stages["preflight"]["reason"] == "the run was stopped (SIGTERM) while it ran"
    assert {e["reason"] for name, e in stages.items() if name != "preflight"} == {"the run was stopped (SIGTERM)"}
    assert (tmp_path / "first_light.md").exists() and gone(child)


def test_a_killed_runner_leaves_no_stage_running_and_its_results_are_still_written(tmp_path):
    wrapper, child = start_wrapper(tmp_path)
    (runner,) = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    os.kill(int(runner), signal.SIGKILL)
    stdout, _ = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 137
    assert "stopped the stage the runner left running" in stdout
    assert "The runner ended before: preflight, install" in (tmp_path / "first_light.md").read_text()
    assert events(tmp_path)[-1]["event"] == "end"
    assert gone(child) and "logs/preflight.log" in bundle_names(tmp_path)  # its log: bundled at the finish
    assert not Path(re.search(r"work in (\S+)", stdout)[1]).exists()
