"""A real uvicorn server on loopback for the server tests, over a paged engine the test can inspect."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette

from hayabusa.engine.cli import build_parser
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.server.replica import ServerSettings, build_server, load_paged_engine

MODEL = "tiny"  # random weights of the real architecture, the real tokenizer; 512 positions


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments `hayabusa ARGV` runs with."""
    parser, _, _ = build_parser(argv)
    return parser.parse_args(argv)


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    engine: PagedEngine
    app: Starlette  # app.state.drain: its drain
    uvicorn: uvicorn.Server  # .servers / .server_state: its event loop's connections and tasks

    def wait_until_idle(self, timeout_s: float = 10.0) -> None:
        """Aborts and finishes land one engine step after the HTTP side lets go; wait for the pool to empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks:
                return
            time.sleep(0.01)
        raise AssertionError(f"the engine never went idle: {self.engine.stats()}")


@contextmanager
def running_server(**settings) -> Iterator[RunningServer]:
    settings = ServerSettings(model=MODEL, backend="reference", device="cpu", **settings)
    engine = load_paged_engine(settings)
    app = build_server(settings, engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, app, server)
    finally:
        server.should_exit = True
        thread.join(30)


class Gate:
    """Holds the engine's model calls, from the `hold_from`-th on, until opened (to catch a server mid-request)."""

    def __init__(self, engine: PagedEngine, hold_from: int) -> None:
        self.num_calls = 0
        self.held = threading.Event()  # a model call is waiting at the gate
        self.opened = threading.Event()
        launch = engine.runner.launch

        def gated_launch(plan):
            self.num_calls += 1
            if self.num_calls >= hold_from and not self.opened.is_set():
                self.held.set()
                self.opened.wait(30)
            return launch(plan)

        engine.runner.launch = gated_launch


def metric(text: str, name: str) -> float:
    """One sample of /metrics text by its exact name and labels, e.g. 'hayabusa_requests_total{finish_reason="abort"}'
    (0 when the labelled series does not exist yet)."""
    for line in text.splitlines():
        sample_name, _, value = line.rpartition(" ")
        if sample_name == name:
            return float(value)
    return 0.0


def post(server: RunningServer, body: dict | bytes, **kwargs) -> httpx.Response:
    """POST /v1/completions with a JSON body (or raw bytes)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/completions", content=content, timeout=30, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> None:
    """An error in OpenAI's shape with this status and param, whose message holds every word; never a traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert "Traceback" not in response.text
