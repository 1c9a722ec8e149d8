"""The GPU first light's command line: bench/gpu_first_light.sh runs `python3 -m first_light` with bench/ on
PYTHONPATH and a scratch directory of its own.

    --work DIR [--budget 540] [--out DIR]   run the plan on a GPU (out: $OUT when set)
    --work DIR --dry-run                    print the plan, each stage's budget and the worst case; run nothing
    --work DIR --cpu-smoke [--dry-run]      the same control flow on a CPU: the tiny model, smoke sizes
    --fail STAGE / --overrun STAGE          make a stage fail at once / run past its limit (proving the runner)
    --work DIR --finish                     finish a run whose runner died (the wrapper's exit trap)

Exit status 0 when every stage that can run on this machine ended ok, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .finish import JSONL, LOG, TAR, RunFacts, finish, finished
from .plan import MODES, RESERVE_S, STAGE_ORDER, build_plan, find_compute_sanitizer, with_faults
from .runner import Stage, StageRunner, append_jsonl, missing_program, stop_left_running, worst_case

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 540.0  # the device tool ends a command at 600 s
# Every stage's: offline, one Triton cache (the warm start fills it, every later stage reads it), fresh caches.
SHARED_ENV = {"TRITON_CACHE_DIR": "{work}/triton-cache", "TORCHINDUCTOR_CACHE_DIR": "{work}/inductor-cache",
              "HAYABUSA_CACHE": "{work}/hayabusa-cache", "HF_HOME": "{work}/hf", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_first_light.sh",
        description="A first look at hayabusa on one GPU that always comes back with numbers: stages in the order "
                    "their numbers are worth, under one deadline; every figure in OUT as it is measured.")
    parser.add_argument("--work", type=Path, required=True, help="the run's scratch directory (made by the wrapper)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help=f"seconds for the whole run, results included (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the results go (default: $OUT when set, else ./first-light-<time>)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the plan's CPU twin (tests the runner)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the plan and its worst case; run nothing")
    what.add_argument("--finish", action="store_true", help="write the summary and results of a run in --work")
    parser.add_argument("--fail", action="append", default=[], metavar="STAGE", choices=STAGE_ORDER,
                        help=f"make this stage fail at once (repeatable); stages: {', '.join(STAGE_ORDER)}")
    parser.add_argument("--overrun", action="append", default=[], metavar="STAGE", choices=STAGE_ORDER,
                        help="make this stage run past its limit, ignoring SIGTERM (repeatable)")
    args = parser.parse_args(argv)
    if args.budget <= RESERVE_S:
        parser.error(f"--budget must be more than the {RESERVE_S:.0f} s kept for the results, got {args.budget:g}")
    return args


def describe(stage: Stage) -> str:
    env = " ".join(f"{key}={value}" for key, value in stage.env.items())
    return (env + " " if env else "") + shlex.join(stage.command)


def print_plan(stages: list[Stage], budget_s: float, mode: str, env: dict[str, str]) -> None:
    shares = sum(s.cap_s for s in stages if not s.unavailable)
    print(f"hayabusa first light, {mode}: {len(stages)} stages in a {budget_s:.0f} s budget "
          f"({RESERVE_S:.0f} s of it kept to merge and bundle the results); their shares sum to {shares:.0f} s")
    print("  every stage: " + " ".join(f"{key}={env[key]}" for key in SHARED_ENV))
    end = 0.0
    for stage, start, limit in worst_case(stages, budget_s, RESERVE_S):
        needs = ",".join(stage.needs) or "-"
        if limit is None:
            print(f"  {stage.name:<21} not run: {stage.unavailable or 'no time left in this budget'}")
            continue
        end = start + limit
        missing = missing_program(stage)
        print(f"  {stage.name:<21} at {start:4.0f} s  budget {limit:4.0f} s  needs {needs}: {stage.what}"
              + (f" [skipped on this machine: {missing}]" if missing else ""))
        print(f"      $ {describe(stage)}")
    print(f"worst case: {end + RESERVE_S:.0f} s of the {budget_s:.0f} s budget (every stage to its limit, then the "
          "results)")


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(f"first-light-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def stage_environment(work: Path, gpu: bool) -> dict[str, str]:
    """The run's environment: offline, one Triton cache and one random checkpoint cache for every stage."""
    env = {**os.environ, **{key: value.format(work=work) for key, value in SHARED_ENV.items()}}
    if gpu:
        env.pop("TRITON_INTERPRET", None)  # a GPU run compiles its kernels
    # bench/ is on the runner's path (gpu_first_light.sh), not the stages': its modules are not top-level names
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO / "bench"]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def stop_on_signals(runner: StageRunner) -> None:
    """SIGTERM, SIGHUP and SIGINT end the stage in flight and skip the rest; the results are still written."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: runner.request_stop(signal.Signals(signum).name))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = args.work.resolve()
    if args.finish:
        stopped = stop_left_running(work / "logs")
        if stopped is not None:
            print(f"stopped the stage the runner left running (process group {stopped})")
        facts = RunFacts.load(work)
        if not finished(facts):
            print("\n".join(finish(facts, REPO, work / "logs", stage_environment(work, gpu=facts.mode == "gpu"))))
        return 0
    mode = MODES["cpu-smoke" if args.cpu_smoke else "gpu"]
    out = out_dir(args).resolve()
    jsonl = out / JSONL
    stages = with_faults(build_plan(mode, python=sys.executable, repo=REPO, work=work, jsonl=jsonl,
                                    sanitizer=find_compute_sanitizer()), sys.executable, args.fail, args.overrun)
    env = stage_environment(work, gpu=mode.device == "cuda")
    if args.dry_run:
        print_plan(stages, args.budget, mode.name, env)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    facts = RunFacts(out, mode.name, mode.preset, sys.executable, args.budget, started + args.budget,
                     tuple(Path(s.artifacts[0]) for s in stages if s.artifacts))
    facts.save(work)

    def say(line: str) -> None:
        print(line, flush=True)
        with (out / LOG).open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    append_jsonl(jsonl, {"event": "plan", "mode": mode.name, "budget_s": args.budget, "reserve_s": RESERVE_S,
                         "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "stages": [{"name": s.name, "cap_s": s.cap_s, "needs": list(s.needs), "what": s.what,
                                     "command": describe(s), "unavailable": s.unavailable} for s in stages]})
    say(f"hayabusa first light, {mode.name}: budget {args.budget:.0f} s; results in {out}; work in {work}")
    runner = StageRunner(stages, budget_s=args.budget, reserve_s=RESERVE_S, cwd=REPO, logs=work / "logs",
                         jsonl=jsonl, tar=out / TAR, env=env, say=say)
    stop_on_signals(runner)
    try:
        outcomes = runner.run()
    finally:
        for line in finish(facts, REPO, work / "logs", env):
            say(line)
    width = max(len(name) for name in STAGE_ORDER)
    say("---- stages ----")
    for o in outcomes:
        say(f"  {o.stage:<{width}} {o.status:<9} {o.seconds:5.0f} s" + (f"  {o.reason}" if o.reason else ""))
    say(f"done in {time.time() - started:.0f} s of {args.budget:.0f}: {out}")
    return 1 if any(o.status in ("failed", "timed_out") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
