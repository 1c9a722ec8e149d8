"""200 concurrent streaming clients on loopback against a small KV pool, some hanging up mid-stream: every
finished stream equals `Engine.generate`'s output, no KV block leaks, and the server stays healthy."""

import asyncio
import random

import httpx
import openai
import pytest

from hayabusa.engine import Engine, SamplingParams

from server_harness import MODEL, metric, running_server

NUM_CLIENTS = 200
HANG_UP_EVERY = 5  # every 5th client closes its stream after the first chunk
KV_CACHE_BLOCKS = 24  # 384 tokens: a dozen requests at a time, so most wait and some get preempted


def workload(seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens): random lengths, a few shared prefixes (prefix-cache hits)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 31000) for _ in range(16)] for _ in range(3)]
    requests = []
    for _ in range(NUM_CLIENTS):
        prefix = rng.choice(prefixes)[: rng.choice((0, 8, 16))]
        prompt = prefix + [rng.randrange(100, 31000) for _ in range(rng.randint(1, 12))]
        requests.append((prompt, rng.randint(1, 8)))
    return requests


async def stream_one(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int,
                     hang_up: bool) -> tuple[str, str | None] | None:
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    text, finish_reason = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish_reason = chunk.choices[0].finish_reason
        if hang_up:
            await stream.close()
            return None
    return text, finish_reason


async def run_clients(url: str, requests: list[tuple[list[int], int]]) -> list:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        return await asyncio.gather(*(stream_one(client, prompt, max_tokens, i % HANG_UP_EVERY == 0)
                                      for i, (prompt, max_tokens) in enumerate(requests)))
    finally:
        await client.close()


@pytest.mark.usefixtures("one_torch_thread")
def test_concurrent_streams_with_hang_ups_match_generate_and_leak_nothing() -> None:
    requests = workload(seed=0)
    engine = Engine.from_pretrained(MODEL, backend="reference", device="cpu")
    expected = engine.generate([p for p, _ in requests], [SamplingParams(max_new_tokens=n) for _, n in requests])
    engine.close()
    with running_server(kv_cache_blocks=KV_CACHE_BLOCKS) as server:
        results = asyncio.run(run_clients(server.url, requests))
        server.wait_until_idle()  # every block back in the pool, nothing running or waiting
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        metrics = httpx.get(f"{server.url}/metrics").text
    finished = [(i, r) for i, r in enumerate(results) if r is not None]
    assert len(finished) == NUM_CLIENTS - len(range(0, NUM_CLIENTS, HANG_UP_EVERY))
    for i, (text, finish_reason) in finished:
        assert (text, finish_reason) == (expected[i].text, expected[i].finish_reason), f"request {i}"
    reasons = {r: metric(metrics, f'hayabusa_requests_total{{finish_reason="{r}"}}') for r in ("stop", "length",
                                                                                              "abort", "error")}
    assert sum(reasons.values()) == NUM_CLIENTS and reasons["error"] == 0
    assert 1 <= reasons["abort"] <= NUM_CLIENTS // HANG_UP_EVERY  # a hang-up after the last token aborts nothing
    assert metric(metrics, "hayabusa_kv_cache_blocks_in_use") == 0
