"""The limits an operator sets on `hayabusa serve`: each refusal is a 400 or 413 in OpenAI's shape naming the flag,
a body too big is refused before it is parsed, and what fits still runs."""

from types import SimpleNamespace

import httpx
import pytest

from hayabusa.engine.server.cli import settings_from_args
from hayabusa.engine.server.protocol import StrictRequest
from hayabusa.engine.server.replica import ServerSettings, request_limits

from server_harness import MODEL, assert_openai_error, parse, post, running_server

MAX_MODEL_LEN = 64
MAX_TOKENS_PER_REQUEST = 200
MAX_REQUEST_BYTES = 64 << 10
MAX_NUM_BATCHED_TOKENS = 32


@pytest.fixture(scope="module")
def server():
    with running_server(kv_cache_blocks=64, max_model_len=MAX_MODEL_LEN, max_tokens_per_request=MAX_TOKENS_PER_REQUEST,
                        max_request_bytes=MAX_REQUEST_BYTES, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as running:
        yield running


def ids(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_serve_flags_become_the_limits() -> None:
    args = parse(["serve", "--model", "tiny", "--max-model-len", "64", "--max-request-bytes", "1000",
                  "--max-tokens-per-request", "5000", "--max-num-batched-tokens", "256", "--allowed-origins",
                  "https://a.example", "https://b.example", "--grace", "2.5"])
    settings = settings_from_args(args)
    assert (settings.max_model_len, settings.max_request_bytes, settings.max_tokens_per_request) == (64, 1000, 5000)
    assert settings.max_num_batched_tokens == 256 and args.grace == 2.5
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    defaults = settings_from_args(parse(["serve", "--model", "tiny"]))
    assert (defaults.max_model_len, defaults.max_request_bytes, defaults.max_tokens_per_request) == (None, 4 << 20,
                                                                                                      1 << 18)


@pytest.mark.parametrize("argv", [["--max-model-len", "0"], ["--max-request-bytes", "-1"], ["--grace", "-1"],
                                  ["--grace", "inf"], ["--max-tokens-per-request", "many"]])
def test_bad_limit_flags_are_usage_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "tiny", *argv])
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_a_max_model_len_past_the_models_positions_is_refused() -> None:
    engine = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    assert request_limits(ServerSettings(model="tiny"), engine).max_model_len == 512  # default: the model's
    with pytest.raises(ValueError, match="--max-model-len 600 is more than the model's 512 positions"):
        request_limits(ServerSettings(model="tiny", max_model_len=600), engine)


def test_the_context_limit_names_the_flag(server) -> None:
    response = post(server, {"model": MODEL, "prompt": ids(60), "max_tokens": 8})
    assert_openai_error(response, 400, "60 prompt tokens + max_tokens 8 = 68 exceed the context length 64 "
                        "(--max-model-len)", param="max_tokens")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert_openai_error(post(server, {"model": MODEL, "prompt": [ids(3), ids(70)], "max_tokens": 1}), 400,
                        "prompt 1: 70 prompt tokens", "the prompt alone is longer", param="prompt")
    scored = post(server, {"model": MODEL, "prompt": ids(64), "max_tokens": 0, "echo": True})  # exactly the context
    assert scored.status_code == 200, scored.text
    fits = post(server, {"model": MODEL, "prompt": ids(60), "max_tokens": 4, "temperature": 0})
    assert fits.json()["usage"]["completion_tokens"] == 4  # in chunks of --max-num-batched-tokens


def test_the_context_limit_is_what_the_server_reports(server) -> None:
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "猫"}).json()["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{server.url}/tokenizer_info").json()["model_max_length"] == MAX_MODEL_LEN
    assert server.engine.scheduler.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS


@pytest.mark.parametrize(("fields", "cost"), [
    ({"n": 30, "max_tokens": 8}, 4 + 30 * 8),
    ({"best_of": 30, "max_tokens": 8, "temperature": 1}, 4 + 30 * 8),
    ({"num_beams": 30, "max_tokens": 8, "temperature": 0}, 4 + 30 * 8),
    ({"prompt": [ids(4, 100 + i) for i in range(25)], "max_tokens": 8}, 25 * 4 + 25 * 8),
])
def test_the_cost_limit_counts_every_sequence_and_prompt(server, fields, cost) -> None:
    body = {"model": MODEL, "prompt": ids(4), **fields}
    assert_openai_error(post(server, body), 400, f"the request may cost {cost} tokens",
                        f"this server allows {MAX_TOKENS_PER_REQUEST} per request (--max-tokens-per-request)",
                        param="max_tokens")
    server.wait_until_idle()  # nothing was queued


def test_a_request_within_the_cost_limit_runs(server) -> None:
    body = {"model": MODEL, "prompt": ids(4), "n": 4, "max_tokens": 49, "seed": 1}  # 4 + 4 * 49 = 200
    response = post(server, body)
    assert response.status_code == 200, response.text
    assert [c["finish_reason"] for c in response.json()["choices"]] == ["length"] * 4


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize", "/detokenize"])
def test_a_body_too_big_is_refused_before_it_is_parsed(server, route, monkeypatch) -> None:
    parsed = []
    monkeypatch.setattr(StrictRequest, "parse", classmethod(lambda cls, body: parsed.append(cls)))
    fifteen_mb = b'{"model": "tiny", "prompt": "' + b"a" * (15 << 20) + b'"}'
    declared = httpx.post(f"{server.url}{route}", content=fifteen_mb, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert_openai_error(declared, 413, f"the request body is {len(fifteen_mb)} bytes",
                        f"at most {MAX_REQUEST_BYTES} (--max-request-bytes)")
    assert declared.json()["error"]["code"] == "request_too_large" and declared.headers["connection"] == "close"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(15):
            yield b"a" * (1 << 20)

    streamed = httpx.post(f"{server.url}{route}", content=chunked(), timeout=30)
    assert_openai_error(streamed, 413, f"more than {MAX_REQUEST_BYTES} bytes", "--max-request-bytes")
    assert parsed == []
    monkeypatch.undo()
    under = httpx.post(f"{server.url}/tokenize", json={"prompt": "猫" * 20_000})  # 60 KB: under the limit
    assert under.status_code == 200 and under.json()["count"] == 20_000
