"""Shutting down without losing a request silently: while draining, new requests get 503 and /health says so;
requests in flight finish within the grace period, the rest end with finish_reason "abort" and their text so far;
`hayabusa serve` does this on SIGTERM (and SIGINT) and exits 0."""

import asyncio
import json
import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from server_harness import MODEL, Gate, assert_openai_error, metric, running_server

LONG = {"model": MODEL, "prompt": "吾輩は猫である。", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def stream_events(url: str, body: dict, events: list[str]) -> None:
    """The `data:` payloads of one streamed completion, appended as they arrive."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events.extend(line.removeprefix("data: ") for line in response.iter_lines() if line)


def finish_reasons(events: list[str]) -> list[str]:
    return [c["finish_reason"] for e in events if e != "[DONE]" for c in json.loads(e)["choices"] if c["finish_reason"]]


def test_a_drain_refuses_new_requests_and_aborts_what_outlives_the_grace() -> None:
    with running_server(kv_cache_blocks=64) as server:
        gate = Gate(server.engine, hold_from=4)  # the engine stops in a decode step of both requests
        events: list[str] = []
        plain: list[httpx.Response] = []
        threads = [threading.Thread(target=stream_events, args=(server.url, LONG, events)),
                   threading.Thread(target=lambda: plain.append(httpx.post(f"{server.url}/v1/completions",
                                                                           json=LONG, timeout=60)))]
        for thread in threads:
            thread.start()
        assert gate.held.wait(30)
        drain = server.app.state.drain
        while drain.loop.num_in_flight < 2:  # both in the engine (one may still wait for its prefill)
            time.sleep(0.01)
        event_loop = server.uvicorn.servers[0].get_loop()
        draining = asyncio.run_coroutine_threadsafe(drain.run(grace_s=0.3), event_loop)
        while not drain.draining:
            time.sleep(0.01)
        refused = httpx.post(f"{server.url}/v1/completions", json=LONG)
        assert_openai_error(refused, 503, "shutting down")
        assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
        assert_openai_error(httpx.post(f"{server.url}/tokenize", json={"prompt": "猫"}), 503, "shutting down")
        health = httpx.get(f"{server.url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert httpx.get(f"{server.url}/metrics").status_code == 200  # still scraped
        time.sleep(0.5)  # the grace is over while the engine is still held: the drain aborts both
        gate.opened.set()
        assert draining.result(timeout=30) == 2
        for thread in threads:
            thread.join(30)
        (response,) = plain
        (choice,) = response.json()["choices"]
        assert response.status_code == 200 and choice["finish_reason"] == "abort"
        assert response.json()["usage"]["completion_tokens"] < 200  # its text so far
        assert finish_reasons(events) == ["abort"] and events[-1] == "[DONE]"
        server.wait_until_idle()  # every KV block back
        assert metric(httpx.get(f"{server.url}/metrics").text, 'hayabusa_requests_total{finish_reason="abort"}') == 2
        assert drain.num_in_flight == 0


def test_requests_that_finish_within_the_grace_finish_as_they_would() -> None:
    with running_server(kv_cache_blocks=64) as server:
        gate = Gate(server.engine, hold_from=2)
        plain: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: plain.append(httpx.post(
            f"{server.url}/v1/completions", json={**LONG, "max_tokens": 4}, timeout=60)))
        thread.start()
        assert gate.held.wait(30)
        drain = server.app.state.drain
        draining = asyncio.run_coroutine_threadsafe(drain.run(grace_s=60), server.uvicorn.servers[0].get_loop())
        while not drain.draining:
            time.sleep(0.01)
        assert_openai_error(httpx.post(f"{server.url}/v1/completions", json=LONG), 503, "shutting down")
        gate.opened.set()
        assert draining.result(timeout=30) == 0  # it returns as soon as nothing is in flight, not after 60 s
        thread.join(30)
        (choice,) = plain[0].json()["choices"]
        assert choice["finish_reason"] == "length" and plain[0].json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_on_a_signal_mid_stream_and_exits_0(signal_number) -> None:
    """A subprocess server signalled mid-stream: once it drains (/health 503) a new request gets 503, the stream
    that outlives the grace ends "abort" with [DONE], and the process exits 0."""
    grace_s = 0.5  # 480 tokens take seconds even on a fast CPU
    command = [shutil.which("hayabusa"), "serve", "--model", MODEL, "--device", "cpu", "--port", "0",
               "--kv-cache-blocks", "64", "--grace", str(grace_s)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"on (http://127\.0\.0\.1:\d+);", process.stdout.readline()).group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        events: list[str] = []
        stream = threading.Thread(target=stream_events, args=(url, {**LONG, "max_tokens": 480}, events))
        stream.start()
        while not events:
            time.sleep(0.01)
        process.send_signal(signal_number)
        signalled = time.monotonic()
        while httpx.get(f"{url}/health", timeout=5).status_code == 200:
            time.sleep(0.01)
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=LONG, timeout=10), 503, "shutting down")
        stream.join(60)
        _, err = process.communicate(timeout=60)
        exited_after_s = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert finish_reasons(events) == ["abort"] and events[-1] == "[DONE]"
    assert len(events) - 2 < 480  # cut short: fewer chunks than tokens asked for
    assert exited_after_s < grace_s + 15
    assert f"{signal.Signals(signal_number).name}: shutting down gracefully" in err
    assert "grace period over: aborted 1 engine requests" in err
    assert re.search(r'"POST /v1/completions" 503 \S+ request_id=[0-9a-f]{32}', err)
