"""Scale-out on a local Ray (CPU, tiny preset, reference backend): `serve --ray` with 2 replicas answers like the
one-process server, and `batch --ray --replicas 2` writes the same file as the one-engine run."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from hayabusa.engine import Engine
from hayabusa.engine.cli import main
from hayabusa.engine.server.replica import ServerSettings

from server_harness import MODEL

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, from its DataContext

PROMPTS = ["吾輩は猫である。", "人とAIが協調するためには、", "東京", "今日は"]


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: two Serve replicas and then two Ray Data actors each reserve one, on any machine.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.usefixtures("local_ray")
def test_serve_on_two_replicas_answers_like_the_engine() -> None:
    from ray import serve

    from hayabusa.engine.server.cli import Scaling
    from hayabusa.engine.server.ray_serve import APP_NAME, start

    engine = Engine.from_pretrained(MODEL, backend="reference", device="cpu")
    expected = [out.text for out in engine.generate(PROMPTS, max_new_tokens=6)]
    engine.close()
    port = free_port()
    start(ServerSettings(model=MODEL, backend="reference", device="cpu", kv_cache_blocks=64), Scaling(replicas=2),
          host="127.0.0.1", port=port)
    try:
        status = serve.status().applications[APP_NAME].deployments[APP_NAME]
        assert status.replica_states == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def complete(prompt: str) -> str:
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(complete, PROMPTS * 2)) == expected * 2
        streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected[0]
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MODEL, "prompt": "a", "x": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "x"
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        serve.shutdown()


@pytest.mark.usefixtures("local_ray")
def test_batch_on_ray_data_writes_what_one_engine_writes(tmp_path) -> None:
    lines = [{"prompt": prompt, "max_new_tokens": 5} for prompt in PROMPTS]
    lines += [{"prompt": [30014, 26883, 26638 + i], "max_new_tokens": 4, "do_sample": True, "temperature": 0.8,
               "seed": i} for i in range(5)]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    common = ["batch", "--model", MODEL, "--backend", "reference", "--device", "cpu", "--input", str(source),
              "--batch-size", "2"]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    assert main([*common, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--replicas", "2"]) == 0
    one = (tmp_path / "one.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "ray.jsonl").read_text(encoding="utf-8") == one
    assert [json.loads(line)["completion_tokens"] for line in one.splitlines()] == [5] * 4 + [4] * 5
