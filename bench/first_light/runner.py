"""Run stages in order under one deadline: each in its own process group under a limit taken from what is left, its
outcome appended as one JSON line the moment it ends, its log appended to one tar file.

A stage's limit, set when it starts. `left`: seconds to the deadline less the reserve kept for the finish; `later`:
the planned shares (cap_s) of the stages after it that can still run; `spare` = left - later - its own share.
  - spare >= 0 (the plan fits): its share, plus a part of the spare (what earlier stages left unused) in proportion
    to its share among itself and the later stages that are not open-ended (the last of them gets all of it). An
    open-ended stage (tests: more time only runs more of them) gets its share alone;
  - spare < 0 (a short --budget, or earlier stages ran long): its share, or all that is left if less: earlier
    stages, whose numbers are worth more, keep their share; a stage left under MIN_STAGE_S is skipped.
So when every stage takes its whole limit, the run ends at the sum of the shares: the plan's worst case.
A stage runs only when every stage it needs ended ok and its program is installed here, else it is skipped with the
reason. At its limit its whole process group gets SIGTERM, and SIGKILL GRACE_S later; a stage that ends is followed
by SIGKILL to its group, for anything it left running.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GRACE_S = 5.0  # SIGTERM to SIGKILL
MIN_STAGE_S = 5.0  # a stage offered less is skipped: it could not even start its interpreter
RUNNING_STAGE = "running-stage.pgid"  # in the logs directory while a stage runs: its process group
LOG_MEMBER_LIMIT = 2 << 20  # bytes of one log kept in the tar: its head and its tail
TAR_LIMIT = 15 << 20  # the device tool returns files of at most 16 MiB


class RunStopped(Exception):
    """The runner itself was told to stop (SIGTERM, SIGHUP, SIGINT): end the stage in flight, skip the rest."""


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # its planned share of the budget: what it may take in the worst case when the plan fits
    command: tuple[str, ...]
    what: str  # one line for the plan: what it runs or measures
    needs: tuple[str, ...] = ()  # stages that must have ended ok first
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the run's environment
    open_ended: bool = False  # more time only runs more of the same: given none of what earlier stages left unused
    unavailable: str | None = None  # why it cannot run on this machine: skipped, not failed
    figures: Callable[[str], dict[str, Any]] | None = None  # its figures, from its log (and the files it wrote)
    artifacts: tuple[Path, ...] = ()  # files or directories it writes that go into the tar beside its log


@dataclass
class Outcome:
    stage: str
    status: str  # "ok", "failed", "timed_out" or "skipped"
    reason: str = ""
    started_s: float | None = None  # seconds after the run's start
    seconds: float = 0.0
    limit_s: float | None = None
    cap_s: float | None = None
    exit_code: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_limit(stage: Stage, left: float, later: list[Stage]) -> float:
    """Seconds the stage may run, given `left` to the deadline (less the reserve) and the `later` stages that can
    still run (see the module's docstring)."""
    spare = left - stage.cap_s - sum(s.cap_s for s in later)
    if spare < 0:
        return min(stage.cap_s, left)
    if stage.open_ended:
        return stage.cap_s
    return stage.cap_s + spare * stage.cap_s / (stage.cap_s + sum(s.cap_s for s in later if not s.open_ended))


def worst_case(stages: list[Stage], budget_s: float, reserve_s: float) -> list[tuple[Stage, float, float | None]]:
    """(stage, start, limit) for every stage if each ran to its limit and all ended ok: the plan's worst case. A
    stage that cannot run here, or gets under MIN_STAGE_S, has limit None."""
    plan, now = [], 0.0
    for index, stage in enumerate(stages):
        if stage.unavailable:
            plan.append((stage, now, None))
            continue
        later = [s for s in stages[index + 1:] if not s.unavailable]
        limit = stage_limit(stage, budget_s - reserve_s - now, later)
        plan.append((stage, now, limit if limit >= MIN_STAGE_S else None))
        now += limit if limit >= MIN_STAGE_S else 0.0
    return plan


def missing_program(stage: Stage) -> str | None:
    """Why the stage's program cannot be run here (not found on PATH, or not an executable file), or None."""
    program = stage.command[0]
    return None if shutil.which(program) else f"{program} is not installed here (not found, or not executable)"


def append_jsonl(path: Path, event: dict[str, Any]) -> None:
    """One JSON line, written and closed at once: a run killed later keeps it."""
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(event, ensure_ascii=False) + "\n")


def capped(data: bytes, limit: int) -> bytes:
    """data, or its head and tail with a line saying how much of the middle was cut."""
    if len(data) <= limit:
        return data
    head, tail = data[: limit // 8], data[-(limit - limit // 8):]
    return head + f"\n[... {len(data) - len(head) - len(tail)} bytes cut ...]\n".encode() + tail


def add_to_tar(tar_path: Path, members: list[tuple[str, Path]]) -> list[str]:
    """Append files (each capped at LOG_MEMBER_LIMIT; directories: their files) under the given names to an
    uncompressed tar, which a later append or a kill leaves readable; what did not fit under TAR_LIMIT is left
    out. Returns the names left out."""
    files = [(f"{name}/{f.relative_to(path)}" if path.is_dir() else name, f)
             for name, path in members if path.exists()
             for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])]
    left_out = []
    with tarfile.open(tar_path, "a") as tar:
        for name, path in files:
            data = capped(path.read_bytes(), LOG_MEMBER_LIMIT)
            if tar_path.stat().st_size + len(data) + 2048 > TAR_LIMIT:
                left_out.append(name)
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return left_out


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is gone: nothing left running
        pass


def stop_left_running(logs: Path) -> int | None:
    """SIGKILL the process group of the stage a killed runner left running (its stages run in sessions of their
    own, so they outlive it); the group id, or None when no stage was running."""
    pidfile = logs / RUNNING_STAGE
    if not pidfile.exists():
        return None
    pgid = int(pidfile.read_text())
    _kill_group(pgid, signal.SIGKILL)
    pidfile.unlink()
    return pgid


class StageRunner:
    """Runs a plan once: `run()` returns every stage's outcome, in plan order."""

    def __init__(self, stages: list[Stage], *, budget_s: float, reserve_s: float, cwd: Path, logs: Path,
                 jsonl: Path, tar: Path, env: Mapping[str, str], say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stages, self.reserve_s, self.cwd, self.logs = stages, reserve_s, cwd, logs
        self.pidfile = logs / RUNNING_STAGE
        self.jsonl, self.tar, self.env, self.say, self.clock = jsonl, tar, dict(env), say, clock
        self.start = clock()
        self.deadline = self.start + budget_s
        self.outcomes: dict[str, Outcome] = {}
        self.stop_requested: str | None = None  # why the run was told to stop (a signal's name)
        self.awaiting = False  # a stage's process is being awaited: a stop request interrupts it at once

    def request_stop(self, reason: str) -> None:
        """Stop the run: at once while a stage's process is awaited, else before the next stage starts (a JSON line,
        the tar or the results are never cut mid-write)."""
        self.stop_requested = reason
        if self.awaiting:
            raise RunStopped(reason)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def run(self) -> list[Outcome]:
        self.logs.mkdir(parents=True, exist_ok=True)
        for index, stage in enumerate(self.stages):
            if self.stop_requested is not None:
                outcome = Outcome(stage.name, "skipped", f"the run was stopped ({self.stop_requested})",
                                  cap_s=stage.cap_s)
            else:
                try:
                    outcome = self._run_stage(index, stage)
                except RunStopped:
                    outcome = self.outcomes[stage.name]
            self._record(stage, outcome)
        return [self.outcomes[stage.name] for stage in self.stages]

    def _blocked(self, stage: Stage) -> str | None:
        """Why the stage cannot run (a need that did not end ok, this machine, its program missing), or None."""
        for need in stage.needs:
            outcome = self.outcomes.get(need)
            if outcome is not None and outcome.status != "ok":
                return f"needs {need}, which {'was skipped' if outcome.status == 'skipped' else outcome.status}"
        return stage.unavailable or missing_program(stage)

    def _run_stage(self, index: int, stage: Stage) -> Outcome:
        blocked = self._blocked(stage)
        if blocked:
            return Outcome(stage.name, "skipped", blocked, cap_s=stage.cap_s)
        left = self.deadline - self.reserve_s - self.clock()
        limit = stage_limit(stage, left, [s for s in self.stages[index + 1:] if not self._blocked(s)])
        if limit < MIN_STAGE_S:
            return Outcome(stage.name, "skipped", f"no time left ({max(left, 0):.0f} s to the deadline)",
                           cap_s=stage.cap_s)
        self.say(f"[{self.elapsed():5.0f} s] {stage.name}: {stage.what} (limit {limit:.0f} s)")
        outcome = Outcome(stage.name, "ok", started_s=round(self.elapsed(), 1), limit_s=round(limit, 1),
                          cap_s=stage.cap_s)
        self.outcomes[stage.name] = outcome  # what RunStopped finds if the runner is stopped meanwhile
        started = self.clock()
        try:
            outcome.exit_code, timed_out = self._execute(stage, limit)
        except OSError as err:  # the command could not start (not installed, not executable)
            outcome.status, outcome.reason = "failed", f"could not start {stage.command[0]}: {err}"
        except RunStopped as stop:
            outcome.status, outcome.reason = "failed", f"the run was stopped ({stop}) while it ran"
            raise
        else:
            if timed_out:
                outcome.status, outcome.reason = "timed_out", f"ran past its {limit:.0f} s limit"
            elif outcome.exit_code != 0:
                outcome.status, outcome.reason = "failed", f"exit status {outcome.exit_code}"
        finally:
            outcome.seconds = round(self.clock() - started, 1)
            outcome.figures = self._figures(stage)
        return outcome

    def _execute(self, stage: Stage, limit: float) -> tuple[int, bool]:
        """Run the stage's command, its output into its log; (exit status, whether it ran past its limit)."""
        log_path = self.logs / f"{stage.name}.log"
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(stage.command)}\n# limit {limit:.0f} s\n".encode())
            log.flush()
            proc = subprocess.Popen(stage.command, cwd=self.cwd, env={**self.env, **stage.env},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: killed as one
            self.pidfile.write_text(str(proc.pid))  # for stop_left_running, should this runner be killed
            try:
                self.awaiting = True  # inside the try: a stop from here on still ends the group below
                if self.stop_requested:  # asked for after this stage was started, before it was awaited
                    raise RunStopped(self.stop_requested)
                return proc.wait(timeout=max(limit - GRACE_S, 0.1)), False
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    return proc.wait(timeout=GRACE_S), True
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    return proc.wait(), True
            finally:
                self.awaiting = False
                _kill_group(proc.pid, signal.SIGKILL)  # whatever it left behind, or all of it if we were stopped
                proc.wait()
                self.pidfile.unlink(missing_ok=True)

    def _figures(self, stage: Stage) -> dict[str, Any]:
        log_path = self.logs / f"{stage.name}.log"
        if stage.figures is None or not log_path.exists():
            return {}
        try:
            return stage.figures(log_path.read_text(encoding="utf-8", errors="replace"))
        except Exception as err:  # noqa: BLE001 - a figure reader's bug must not cost the stage's outcome
            return {"figures_unreadable": f"{type(err).__name__}: {err}"}

    def _record(self, stage: Stage, outcome: Outcome) -> None:
        self.outcomes[stage.name] = outcome
        log = self.logs / f"{stage.name}.log"
        append_jsonl(self.jsonl, {"event": "stage", **outcome.as_dict(),
                                  "log": f"logs/{log.name}" if log.exists() else None})
        left_out = add_to_tar(self.tar, [(f"logs/{log.name}", log),
                                         *((f"{stage.name}/{path.name}", path) for path in stage.artifacts)])
        if left_out:
            self.say(f"  (left out of {self.tar.name}, over its size limit: {', '.join(left_out)})")
        took = f" in {outcome.seconds:.0f} s" if outcome.started_s is not None else ""
        self.say(f"[{self.elapsed():5.0f} s] {stage.name}: {outcome.status}{took}"
                 + (f": {outcome.reason}" if outcome.reason else ""))
        if outcome.status in ("failed", "timed_out") and log.exists():
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
            self.say("\n".join(f"    | {line[:200]}" for line in tail))
