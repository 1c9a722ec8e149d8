"""The end of a run, however it ended: merge the bench results into one `<device>-<date>` triple, write the summary
(first_light.md) from the JSON lines, and check that the output directory holds what the device tool returns.

What a run leaves in its output directory (the device tool returns at most 8 files of at most 16 MiB, named with
letters, digits, '.', '_' and '-'):
  first_light.jsonl      the plan, then every figure as measured and every stage's outcome as it ended (live)
  first_light.log        what the runner printed (live)
  first_light_logs.tar   every stage's log and the files it wrote, appended as each stage ends
  first_light.md         the summary: stages, limits, outcomes, figures
  <device>-<date>.json / .md / .png   the bench stages' results merged (hayabusa bench's results triple)
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import add_to_tar, append_jsonl

JSONL, LOG, TAR, SUMMARY = "first_light.jsonl", "first_light.log", "first_light_logs.tar", "first_light.md"
OUT_FILE_LIMIT, OUT_BYTES_LIMIT = 8, 16 << 20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MIN_MERGE_S = 5.0


@dataclass(frozen=True)
class RunFacts:
    """What the finish needs to know of a run; saved in its work directory so the wrapper's trap can finish a run
    whose runner died."""

    out: Path
    mode: str
    preset: str
    python: str
    budget_s: float
    deadline: float  # time.time() by which the finish must be done
    bench_outputs: tuple[Path, ...]  # the bench stages' --out directories, in plan order

    def save(self, work: Path) -> None:
        facts = {**self.__dict__, "out": str(self.out), "bench_outputs": [str(p) for p in self.bench_outputs]}
        (work / "run.json").write_text(json.dumps(facts), encoding="utf-8")

    @classmethod
    def load(cls, work: Path) -> RunFacts:
        facts = json.loads((work / "run.json").read_text(encoding="utf-8"))
        return cls(**{**facts, "out": Path(facts["out"]),
                      "bench_outputs": tuple(Path(p) for p in facts["bench_outputs"])})


def finish(facts: RunFacts, cwd: Path, logs: Path, env: Mapping[str, str]) -> list[str]:
    """Merge, summarize, check; the lines to print. `logs`: the stages' log directory, whose logs not yet in the tar
    (a stage that was running when the runner died) are added; `env`: the stages' environment."""
    with tarfile.open(facts.out / TAR, "a") as tar:
        bundled = set(tar.getnames())
    add_to_tar(facts.out / TAR, [(f"logs/{log.name}", log) for log in sorted(logs.glob("*.log"))
                                 if f"logs/{log.name}" not in bundled])
    lines = merge_bench_results(facts, cwd, env)
    events = read_events(facts.out / JSONL)
    (facts.out / SUMMARY).write_text(summary(events, facts, lines), encoding="utf-8")
    append_jsonl(facts.out / JSONL, {"event": "end", "merged": lines})
    return lines + out_problems(facts.out)


def finished(facts: RunFacts) -> bool:
    """Whether the run's finish already ran (its last event is "end")."""
    events = read_events(facts.out / JSONL)
    return bool(events) and events[-1]["event"] == "end"


def merge_bench_results(facts: RunFacts, cwd: Path, env: Mapping[str, str]) -> list[str]:
    """Run hayabusa.bench.merge_results on the bench stages' results (in a process of its own, with what is left
    of the time); what it wrote, or why nothing."""
    found = [path / "results.json" for path in facts.bench_outputs if (path / "results.json").exists()]
    if not found:
        return ["no bench stage wrote results.json: the figures measured are in first_light.jsonl"]
    seconds = facts.deadline - time.time()
    if seconds < MIN_MERGE_S:
        return [f"no time left to merge the bench results ({max(seconds, 0):.0f} s): they are in {TAR}"]
    command = [facts.python, "-m", "hayabusa.bench.merge_results", "--out", str(facts.out), "--preset", facts.preset,
               *map(str, found)]
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return [f"merging the bench results ran out of time ({seconds:.0f} s): they are in {TAR}"]
    if done.returncode != 0:
        return [f"merging the bench results failed: {done.stderr.strip()[-500:]}"]
    return [f"merged {len(found)} bench results into {Path(p).name}" for p in done.stdout.split()]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines written so far (a line cut off by a kill is left out)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def summary(events: list[dict[str, Any]], facts: RunFacts, merge_lines: list[str]) -> str:
    plan = next((e for e in events if e["event"] == "plan"), {})
    stages = [e for e in events if e["event"] == "stage"]
    ran = {e["stage"] for e in stages}
    ended = max(((e["started_s"] or 0) + e["seconds"] for e in stages), default=0)
    lines = [f"# hayabusa first light ({facts.mode}, random {facts.preset} weights)", "",
             f"Budget {facts.budget_s:.0f} s; the last stage ended {ended:.0f} s after the start.", "",
             "| stage | status | seconds | limit | planned | figures / reason |", "|---|---|---|---|---|---|"]
    for e in stages:
        detail = e["reason"] or ", ".join(f"{k}: {v}" for k, v in _headline(e["figures"]).items())
        lines.append(f"| {e['stage']} | {e['status']} | {_fmt(e['seconds'], 0)} | {_fmt(e['limit_s'], 0)} | "
                     f"{_fmt(e['cap_s'], 0)} | {detail} |")
    never = [s["name"] for s in plan.get("stages", []) if s["name"] not in ran]
    if never:
        lines += ["", f"The runner ended before: {', '.join(never)}."]
    records = [e for e in events if e["event"] == "record"]
    if records:
        lines += ["", "## Figures (as measured, in order)", "",
                  "| engine | scenario | case | ms / token | ms | tokens / s | % of roofline |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['engine']} | {r['scenario']} | {r['case']} | {_fmt(r['ms_per_token'])} | {_fmt(r['ms'])} | "
                  f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(r['pct_roofline'], 1)} |" for r in records]
    failures = [e for e in events if e["event"] == "error"]
    if failures:
        lines += ["", "## Failed measurements", ""] + [f"- `{e['engine']}` {e['scenario']}: {e['error']}"
                                                       for e in failures]
    lines += ["", "## Files", "", *(f"- {line}" for line in merge_lines),
              f"- {JSONL}: every event; {TAR}: every stage's log and output; {LOG}: the runner's own output", ""]
    return "\n".join(lines)


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The few figures of a stage worth a table cell."""
    if "versions" in figures:
        versions = figures["versions"]
        cell = {"versions": ", ".join(f"{name} {versions.get(name)}" for name in ("torch", "triton", "transformers"))}
        gpu = figures.get("gpu")
        if gpu:
            cell["gpu"] = (f"{gpu['name']} {gpu['capability']}, {gpu['multiprocessors']} SMs, "
                           f"{gpu['free_memory_gib']} of {gpu['memory_gib']} GiB free")
        return cell
    if "records" in figures:
        return {"figures": len(figures["records"]), "skipped": len(figures["skipped"]),
                "failed": len(figures["errors"])}
    if "checks" in figures:
        return {"checks passed": f"{sum(c['passed'] for c in figures['checks'].values())} of {len(figures['checks'])}"}
    if figures.get("cold_start_ms") is not None:
        return {"cold start": f"{figures['cold_start_ms'] / 1e3:.1f} s"}
    return {key: value for key, value in figures.items()
            if key in ("tests", "sanitizer_errors", "checkpoint_bytes") and value is not None}


def out_problems(out: Path) -> list[str]:
    """What in `out` the device tool would not return whole."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{p.name}: {p.stat().st_size} bytes, over 16 MiB" for p in files if p.stat().st_size > OUT_BYTES_LIMIT]
    problems += [f"{p.name}: a name the device tool refuses" for p in files if not OUT_NAME.match(p.name)]
    if len(files) > OUT_FILE_LIMIT:
        problems.append(f"{len(files)} files in {out}: the device tool returns {OUT_FILE_LIMIT}")
    return [f"warning: {problem}" for problem in problems]
