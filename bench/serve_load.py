"""Load on a running server with locust (headless, in a process of its own, loopback only): `run_load` runs
serve_locustfile.py's streaming users and returns what they measured.

Used by the serve scenario (serve_scenario.py) and the server's soak test. Every run is bounded: by locust's
--run-time and by a timeout on its process.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOCUSTFILE = Path(__file__).with_name("serve_locustfile.py")
QUIT_MARGIN_S = 60  # locust's own start and stop, beyond --run-time, before its process is killed


@dataclass
class LoadResult:
    users: int
    run_time_s: float  # locust's --run-time: the window the requests per second are counted over
    completed: int
    hung_up: int  # closed by the client on purpose
    errors: dict[str, int]  # failed requests by kind ("status 503", "ConnectionError", ...)
    ttft_s: list[float]  # per request: from sending it to its first chunk
    itl_s: list[float]  # gaps between consecutive chunks of a request (one per token unless its text is held)
    e2e_s: list[float]  # per completed request: from sending it to its last chunk
    completion_tokens: int  # as the server's usage chunks counted them (completed requests)
    seconds: float  # from the first request sent to the last one ended

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The figures a report shows: counts, rates, and p50/p99 of each latency in ms."""
        figures: dict[str, Any] = {"users": self.users, "completed": self.completed, "hung_up": self.hung_up,
                                   "errors": self.errors, "seconds": self.seconds,
                                   "requests_per_s": self.requests_per_s, "tokens_per_s": self.tokens_per_s}
        for name, samples in (("ttft", self.ttft_s), ("itl", self.itl_s), ("e2e", self.e2e_s)):
            for q in (50, 99):
                figures[f"{name}_p{q}_ms"] = percentile(samples, q) * 1e3 if samples else None
        return figures


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (a value that was measured)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_loopback(url: str) -> None:
    """Load goes to this machine only."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"load runs against a loopback address (127.0.0.0/8, ::1, localhost) only, got {url}")


def run_load(url: str, *, users: int, workload: dict[str, Any], run_time_s: float) -> LoadResult:
    """`users` streaming users for up to run_time_s seconds (or until workload["max_requests"] requests ended).

    workload: model, prompts (texts or token-id lists, drawn at random), max_tokens ([low, high], drawn per
    request), hang_up (the share of requests closed on purpose), seed, api_key (optional), max_requests (optional).
    """
    check_loopback(url)
    if users < 1 or run_time_s <= 0:
        raise ValueError(f"need users >= 1 and run_time_s > 0, got {users} and {run_time_s}")
    with tempfile.TemporaryDirectory(prefix="hayabusa-load-") as scratch:
        out = Path(scratch) / "samples.json"
        environment = {**os.environ, "HAYABUSA_LOAD": json.dumps({**workload, "out": str(out)})}
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
                   "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{math.ceil(run_time_s)}s",
                   "--stop-timeout", "0", "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        finished = subprocess.run(command, env=environment, capture_output=True, text=True, check=False,
                                  timeout=run_time_s + QUIT_MARGIN_S)
        if finished.returncode != 0 or not out.exists():
            raise RuntimeError(f"locust exited with status {finished.returncode}: {finished.stderr[-2000:]}")
        samples = json.loads(out.read_text(encoding="utf-8"))
    first, last = samples["first_sent"], samples["last_ended"]
    return LoadResult(users=users, run_time_s=run_time_s, completed=samples["completed"], hung_up=samples["hung_up"],
                      errors=samples["errors"], ttft_s=samples["ttft_s"], itl_s=samples["itl_s"],
                      e2e_s=samples["e2e_s"], completion_tokens=samples["completion_tokens"],
                      seconds=(last - first) if first is not None and last is not None else 0.0)
