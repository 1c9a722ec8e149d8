"""Streaming users of /v1/completions, for `hayabusa bench --scenarios serve` and the server's soak test.

Locust runs this file headless in a process of its own (importing locust patches the standard library with gevent,
which no other process of hayabusa's may suffer); bench/serve_load.py starts it against a loopback server and reads
what it writes. The workload comes as JSON in $HAYABUSA_LOAD; when locust quits, the samples go to the file the
workload names: per request the time to its first chunk and the gaps between its chunks, whole-request times,
outcomes (completed, hung up on purpose, errors by kind) and the completion tokens the server counted.

Each user sends its next request as soon as its last one ended (a closed loop). With `hang_up` > 0 that share of
requests closes the connection on purpose: at its first chunk or after a random number of them. With
`max_requests`, locust quits once that many requests have ended; otherwise at its --run-time.
"""

import json
import os
import random
import time

import gevent
from locust import HttpUser, constant, events, task

WORKLOAD = json.loads(os.environ["HAYABUSA_LOAD"])
RANDOM = random.Random(WORKLOAD["seed"])
SAMPLES = {"ttft_s": [], "itl_s": [], "e2e_s": [], "completion_tokens": 0, "completed": 0, "hung_up": 0,
           "errors": {}, "first_sent": None, "last_ended": None}
STATE = {"started": 0, "ended": 0}


def ended(kind: str | None = None) -> None:
    """One request over (kind: why it failed, None if it did not)."""
    if kind is not None:
        SAMPLES["errors"][kind] = SAMPLES["errors"].get(kind, 0) + 1
    SAMPLES["last_ended"] = time.time()
    STATE["ended"] += 1


class StreamingUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        if WORKLOAD.get("api_key"):
            self.client.headers["Authorization"] = f"Bearer {WORKLOAD['api_key']}"

    @task
    def complete(self) -> None:
        limit = WORKLOAD.get("max_requests")
        if limit is not None and STATE["started"] >= limit:
            if STATE["ended"] >= limit:
                gevent.spawn(self.environment.runner.quit)  # (from a greenlet of its own: quit stops this one)
            gevent.sleep(0.05)
            return
        STATE["started"] += 1
        max_tokens = RANDOM.randint(*WORKLOAD["max_tokens"])
        hang_up_after = RANDOM.randint(0, max_tokens) if RANDOM.random() < WORKLOAD["hang_up"] else None
        body = {"model": WORKLOAD["model"], "prompt": RANDOM.choice(WORKLOAD["prompts"]), "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        SAMPLES["first_sent"] = SAMPLES["first_sent"] or time.time()
        sent = last = time.perf_counter()
        chunks = 0
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions (stream)") as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                ended(f"status {response.status_code}" if response.status_code else type(response.error).__name__)
                return
            try:
                for line in response.iter_lines(chunk_size=None):  # None: each line as it arrives
                    if hang_up_after is not None and chunks >= hang_up_after:
                        response.close()  # unread: the connection is dropped, not reused
                        response.success()
                        SAMPLES["hung_up"] += 1
                        ended()
                        return
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if not chunk["choices"]:  # the usage chunk, last
                        SAMPLES["completion_tokens"] += chunk["usage"]["completion_tokens"]
                        continue
                    now = time.perf_counter()
                    SAMPLES["ttft_s" if chunks == 0 else "itl_s"].append(now - last if chunks else now - sent)
                    last, chunks = now, chunks + 1
            except Exception as err:  # noqa: BLE001 - a broken stream is an outcome to count, whatever broke it
                response.failure(f"{type(err).__name__}: {err}")
                ended(type(err).__name__)
                return
            response.success()
        SAMPLES["e2e_s"].append(time.perf_counter() - sent)
        SAMPLES["completed"] += 1
        ended()


@events.quitting.add_listener
def write_samples(environment, **kwargs) -> None:
    with open(WORKLOAD["out"], "w", encoding="utf-8") as out:
        json.dump(SAMPLES, out)
