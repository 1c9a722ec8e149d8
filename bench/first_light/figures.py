"""Each stage's figures, read from its log or the files it wrote, also when it was cut short (a killed pytest still
printed every test it finished; a killed bench appended every figure it measured to the JSON lines)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)
VERIFY_LINE = re.compile(r"^  (ok  |FAIL) (.{16}) (.*)$", re.MULTILINE)  # verify prints f"  {mark} {name:<16} {detail}"
SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
SANITIZER_FINDING = re.compile(r"^========= (Invalid|Out of range|Misaligned|Uninitialized)[^\n]*", re.MULTILINE)
LISTED = 20  # failing tests or findings named in a stage's figures; the log has the rest


def last_json(log: str) -> dict[str, Any]:
    """The last line of the log that is a JSON object ({} when none is)."""
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def pytest_outcomes(log: str) -> dict[str, Any]:
    """Tests finished by outcome (from `pytest -v`), and the ones that failed."""
    outcomes = PYTEST_LINE.findall(log)
    failed = [test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    return {"tests": dict(Counter(outcome.lower() for _, outcome in outcomes)), "failed_tests": failed[:LISTED]}


def sanitizer_findings(log: str) -> dict[str, Any]:
    """compute-sanitizer's error count (None when it never printed its summary: cut short) and its first findings."""
    summaries = SANITIZER_SUMMARY.findall(log)
    return {"sanitizer_errors": int(summaries[-1]) if summaries else None,
            "sanitizer_findings": [match.group(0) for match in SANITIZER_FINDING.finditer(log)][:LISTED]}


def verify_checks(log: str) -> dict[str, Any]:
    """`hayabusa verify`'s checks: {name: {"passed", "detail"}}."""
    return {"checks": {name.strip(): {"passed": mark == "ok  ", "detail": detail.strip()}
                       for mark, name, detail in VERIFY_LINE.findall(log)}}


def bench_figures(out: Path) -> dict[str, Any]:
    """The figures of one `hayabusa bench` run from its results.json: compact rows, skips and failures. A run cut
    short wrote none; its figures are the JSON lines it appended while it ran."""
    path = out / "results.json"
    if not path.exists():
        return {"results": None}
    results = json.loads(path.read_text(encoding="utf-8"))
    rows = [{key: record[key] for key in ("engine", "scenario", "case", "ms_per_token", "ms", "tokens_per_s",
                                          "pct_roofline")} for record in results["records"]]
    return {"results": str(path), "device": results["device"], "records": rows,
            "decode_kernel_tables": len(results.get("decode_kernels", [])),
            "skipped": results["skipped"], "errors": results["errors"]}
