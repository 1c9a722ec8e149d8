"""The server under trouble: a full queue (429), a failing engine step (500, then it keeps serving), clients that
go away mid-request (their requests are aborted and their KV blocks freed), requests bigger than the KV pool."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_harness import MODEL, Gate, metric, running_server

BODY = {"model": MODEL, "prompt": "吾輩は猫である。", "max_tokens": 4, "temperature": 0}
ABORTED = 'hayabusa_requests_total{finish_reason="abort"}'


def post(url: str, body: dict, timeout: float | httpx.Timeout = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_error(response: httpx.Response, status: int, error_type: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and "Traceback" not in response.text
    for word in words:
        assert word in error["message"]
    return error


def test_a_full_queue_answers_429_with_retry_after_and_drains() -> None:
    with running_server(kv_cache_blocks=64, max_waiting=2) as server, ThreadPoolExecutor(3) as pool:
        gate = Gate(server.engine, hold_from=1)
        first = pool.submit(post, server.url, BODY)
        assert gate.held.wait(10)  # the first request is inside the engine step
        queued = [pool.submit(post, server.url, BODY) for _ in range(2)]
        wait_for(lambda: server.engine.stats().num_waiting == 2, "two waiting requests")
        refused = post(server.url, BODY)
        error = assert_error(refused, 429, "rate_limit_error", "2 requests are waiting", "accepts 2")
        assert error["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
        gate.opened.set()
        texts = {f.result().json()["choices"][0]["text"] for f in [first, *queued]}
        assert len(texts) == 1  # the same greedy completion, batched or not
        assert post(server.url, BODY).status_code == 200
        server.wait_until_idle()


def test_an_engine_step_failure_answers_500_and_the_server_keeps_serving() -> None:
    with running_server(kv_cache_blocks=64) as server:
        launch = server.engine.runner.launch
        calls = {"n": 0, "fail_at": {1, 4}}  # a prefill, then a decode step of the streamed request

        def flaky_launch(plan):
            calls["n"] += 1
            if calls["n"] in calls["fail_at"]:
                raise RuntimeError("simulated device fault")
            return launch(plan)

        server.engine.runner.launch = flaky_launch
        error = assert_error(post(server.url, BODY), 500, "server_error", "RuntimeError: simulated device fault")
        assert error["code"] == "engine_error"
        body = {**BODY, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200  # the failure came after the headers
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert events[-1] == "[DONE]"
        assert "simulated device fault" in json.loads(events[-2])["error"]["message"]
        server.wait_until_idle()
        assert post(server.url, BODY).status_code == 200
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert metric(httpx.get(f"{server.url}/metrics").text, 'hayabusa_rejected_requests_total{status="500"}') == 2


def test_a_client_that_goes_away_mid_request_frees_its_blocks() -> None:
    with running_server(kv_cache_blocks=64) as server:
        gate = Gate(server.engine, hold_from=3)  # the engine stops inside the request's second decode step
        body = {**BODY, "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            post(server.url, body, timeout=httpx.Timeout(30, read=1.0))
        assert gate.held.is_set()
        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, ABORTED) == 1, "the abort")
        gate.opened.set()
        server.wait_until_idle()
        assert metric(httpx.get(f"{server.url}/metrics").text, "hayabusa_generation_tokens_total") < 200


def test_a_stream_closed_mid_way_frees_its_blocks() -> None:
    with running_server(kv_cache_blocks=64) as server:
        gate = Gate(server.engine, hold_from=3)
        body = {**BODY, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            assert gate.held.wait(10)
        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, ABORTED) == 1, "the abort")
        gate.opened.set()
        server.wait_until_idle()
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "hayabusa_generation_tokens_total") < 200
        assert post(server.url, BODY).status_code == 200


def test_a_request_bigger_than_the_kv_pool_is_refused_naming_the_limit() -> None:
    with running_server(kv_cache_blocks=4) as server:  # 4 blocks of 16 tokens
        error = assert_error(post(server.url, {**BODY, "max_tokens": 100}), 400, "invalid_request_error",
                             "the pool holds only 4")
        assert "KV blocks" in error["message"]
        assert post(server.url, BODY).status_code == 200
