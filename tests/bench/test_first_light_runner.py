"""The first light's stage runner on its own: how limits follow the deadline, what a failing, overrunning or blocked
stage leaves, how its process group is ended, and what goes into the JSON lines and the tar."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from hayabusa.bench.first_light.figures import last_json, pytest_outcomes, sanitizer_findings, verify_checks
from hayabusa.bench.first_light.runner import (
    GRACE_S,
    LOG_MEMBER_LIMIT,
    MIN_STAGE_S,
    Stage,
    StageRunner,
    add_to_tar,
    stage_limit,
    stop_left_running,
    worst_case,
)


def stage(name: str, cap: float, script: str = "pass", **fields) -> Stage:
    return Stage(name, cap, (sys.executable, "-c", script), f"the {name} stage", **fields)


def test_when_the_plan_fits_each_stage_gets_its_share_and_a_proportional_part_of_what_was_saved():
    later = [stage("b", 30), stage("c", 60), stage("tests", 50, open_ended=True)]
    assert stage_limit(stage("a", 10), left=150, later=later) == 10  # nothing saved: exactly its share
    # 40 s saved: a's part is 10 / (10 + 30 + 60); open-ended stages take none of it
    assert stage_limit(stage("a", 10), left=190, later=later) == pytest.approx(14)
    assert stage_limit(stage("tests", 50, open_ended=True), left=190, later=[]) == 50
    assert stage_limit(stage("last", 20), left=75, later=[]) == 75  # the last stage gets all that is left


def test_when_the_plan_does_not_fit_earlier_stages_keep_their_share_and_later_ones_get_what_is_left():
    later = [stage("b", 30), stage("c", 60)]
    assert stage_limit(stage("a", 40), left=100, later=later) == 40
    assert stage_limit(stage("b", 30), left=20, later=[stage("c", 60)]) == 20


def test_the_worst_case_of_a_fitting_plan_is_the_sum_of_its_shares():
    stages = [stage("a", 10), stage("b", 30), stage("gone", 99, unavailable="no such tool"), stage("c", 60)]
    plan = worst_case(stages, budget_s=115, reserve_s=15)
    assert [(s.name, start, limit) for s, start, limit in plan] == [
        ("a", 0, 10), ("b", 10, 30), ("gone", 40, None), ("c", 40, 60)]
    short = worst_case(stages, budget_s=60, reserve_s=15)  # 45 s for 100 s of shares: c gets the 5 s left
    assert [(s.name, limit) for s, _, limit in short] == [("a", 10), ("b", 30), ("gone", None), ("c", 5)]
    assert worst_case(stages, budget_s=58, reserve_s=15)[-1][2] is None  # 3 s left: under MIN_STAGE_S, not run
    assert MIN_STAGE_S > 3


OVERRUN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
           "print('child', child.pid, flush=True); time.sleep(600)")


def run_stages(tmp_path: Path, stages: list[Stage], budget: float) -> tuple[list, list[dict], list[str]]:
    said: list[str] = []
    runner = StageRunner(stages, budget_s=budget, reserve_s=2, cwd=tmp_path, logs=tmp_path / "logs",
                         jsonl=tmp_path / "out.jsonl", tar=tmp_path / "logs.tar", env=os.environ, say=said.append)
    outcomes = runner.run()
    events = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return outcomes, events, said


def test_a_failing_stage_skips_its_dependents_an_overrunning_one_is_killed_whole_and_the_rest_still_run(tmp_path):
    stages = [stage("fails", 10, "import sys; print('bad input'); sys.exit(4)"),
              stage("needs-it", 10, needs=("fails",)),
              stage("overruns", 7, OVERRUN),
              stage("figures", 10, "print('{\"answer\": 42}')", figures=last_json),
              stage("no-tool", 10, unavailable="needs a GPU"),
              Stage("missing", 10, ("no-such-program-here",), "a program this machine lacks")]
    start = time.monotonic()
    outcomes, events, said = run_stages(tmp_path, stages, budget=30)
    took = time.monotonic() - start
    by_name = {o.stage: o for o in outcomes}
    assert [(o.stage, o.status) for o in outcomes] == [
        ("fails", "failed"), ("needs-it", "skipped"), ("overruns", "timed_out"), ("figures", "ok"),
        ("no-tool", "skipped"), ("missing", "skipped")]
    assert by_name["fails"].exit_code == 4 and by_name["fails"].reason == "exit status 4"
    assert by_name["needs-it"].reason == "needs fails, which failed"
    assert by_name["no-tool"].reason == "needs a GPU" and "no-such-program-here is not installed" in \
        by_name["missing"].reason
    overrun = by_name["overruns"]
    # its limit: its 7 s share plus a part of what the quick stages before it saved; SIGTERM ignored, so it was
    # SIGKILLed GRACE_S after the SIGTERM, at its limit
    assert overrun.limit_s >= 7 and overrun.limit_s - 0.5 <= overrun.seconds <= overrun.limit_s + 1
    assert overrun.limit_s - GRACE_S > 0
    child = int(re.search(r"^child (\d+)$", (tmp_path / "logs" / "overruns.log").read_text(), re.MULTILINE)[1])
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    assert by_name["figures"].figures == {"answer": 42}
    assert took < 30
    # one line per stage, as each ended, with its log; the failing stage's log tail is printed
    assert [e["stage"] for e in events] == [s.name for s in stages]
    assert events[0]["log"] == "logs/fails.log" and events[1]["log"] is None
    assert any("bad input" in line for line in said)
    with tarfile.open(tmp_path / "logs.tar") as tar:
        assert sorted(tar.getnames()) == ["logs/fails.log", "logs/figures.log", "logs/overruns.log"]
        assert b"bad input" in tar.extractfile("logs/fails.log").read()


def test_a_stage_offered_too_little_time_is_skipped_and_the_deadline_holds(tmp_path):
    stages = [stage("slow", 30, OVERRUN), stage("after", 10)]
    start = time.monotonic()
    outcomes, _, _ = run_stages(tmp_path, stages, budget=8)  # 6 s to spend: slow gets them all, after none
    assert time.monotonic() - start < 8
    assert [(o.stage, o.status) for o in outcomes] == [("slow", "timed_out"), ("after", "skipped")]
    assert outcomes[1].reason.startswith("no time left")


def test_logs_are_capped_in_the_tar_and_appends_keep_it_readable(tmp_path):
    big, small = tmp_path / "big.log", tmp_path / "small.log"
    big.write_bytes(b"first line\n" + b"x" * (3 * LOG_MEMBER_LIMIT) + b"\nlast line\n")
    small.write_text("short\n")
    tar_path = tmp_path / "bundle.tar"
    assert add_to_tar(tar_path, [("logs/big.log", big)]) == []
    assert add_to_tar(tar_path, [("logs/small.log", small), ("gone", tmp_path / "missing")]) == []
    with tarfile.open(tar_path) as tar:
        kept = tar.extractfile("logs/big.log").read()
        assert tar.getnames() == ["logs/big.log", "logs/small.log"]
    assert len(kept) < LOG_MEMBER_LIMIT + 100
    assert kept.startswith(b"first line") and kept.endswith(b"last line\n") and b"bytes cut ..." in kept


def test_the_stage_a_killed_runner_left_running_is_stopped(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    (tmp_path / "running-stage.pgid").write_text(str(proc.pid))
    assert stop_left_running(tmp_path) == proc.pid
    assert proc.wait(timeout=10) == -9
    assert stop_left_running(tmp_path) is None


PYTEST_LOG = """\
tests/kernels/test_gemv.py::test_matches[float16-1] PASSED                 [ 10%]
tests/kernels/test_gemv.py::test_matches[float16-4] FAILED                 [ 20%]
tests/kernels/test_gemv.py::test_interpreted_only SKIPPED (needs the CPU)  [ 30%]
tests/kernels/test_decode_attention.py::test_split[2] PASSED
"""
SANITIZER_LOG = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 2 bytes
=========     at _gemv_kernel+0x1c0
========= ERROR SUMMARY: 1 error
"""
VERIFY_LOG = """\
  ok   layer 0 out      max |err| 1.367e-04  rel 5.265e-04
  FAIL greedy 2         3/4 tokens identical
verify: FAILED: greedy 2 (tolerance 0.03 for float16)
"""


def test_figures_are_read_from_logs_cut_short_too():
    assert pytest_outcomes(PYTEST_LOG) == {"tests": {"passed": 2, "failed": 1, "skipped": 1},
                                           "failed_tests": ["tests/kernels/test_gemv.py::test_matches[float16-4]"]}
    assert sanitizer_findings(SANITIZER_LOG) == {"sanitizer_errors": 1, "sanitizer_findings": [
        "========= Invalid __global__ read of size 2 bytes"]}
    assert sanitizer_findings(SANITIZER_LOG.split("=========     at")[0])["sanitizer_errors"] is None  # killed
    assert verify_checks(VERIFY_LOG) == {"checks": {
        "layer 0 out": {"passed": True, "detail": "max |err| 1.367e-04  rel 5.265e-04"},
        "greedy 2": {"passed": False, "detail": "3/4 tokens identical"}}}
    assert last_json('{"a": 1}\nnoise\n{"b": 2}\n{broken\n') == {"b": 2} and last_json("nothing") == {}
