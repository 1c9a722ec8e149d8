"""`hayabusa serve` through the official openai client and raw HTTP: what /v1/completions answers, how it streams,
and how it refuses bad requests (OpenAI's error shape, never a traceback). Outputs are compared with
`Engine.generate` on the same weights (tiny preset, fp32, CPU)."""

import json
from dataclasses import replace

import httpx
import openai
import pytest

from hayabusa.engine import Engine

from server_harness import MODEL, assert_openai_error, metric, post, running_server

PROMPT = "吾輩は猫である。名前はまだ無い。"
PROMPTS = [PROMPT, "人とAIが協調するためには、", "東京"]


@pytest.fixture(scope="module")
def server():
    with running_server(kv_cache_blocks=64) as running:
        yield running


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained(MODEL, backend="reference", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


# ---- completions through the openai client ------------------------------------------------------------------------

def test_plain_completion_equals_engine_generate(client, engine) -> None:
    want = engine.generate(PROMPT, max_new_tokens=12)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")
    (choice,) = got.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, want.text, "length", None)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert got.usage.total_tokens == len(want.prompt_token_ids) + 12


def test_prompt_lists_and_token_ids(client, engine) -> None:
    want = engine.generate(PROMPTS, max_new_tokens=6)
    got = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [(c.index, c.text) for c in got.choices] == [(i, w.text) for i, w in enumerate(want)]
    ids = [w.prompt_token_ids for w in want]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [w.text for w in want]
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, temperature=0)
    assert one.choices[0].text == want[1].text and one.usage.prompt_tokens == len(ids[1])


def test_streamed_deltas_join_to_the_plain_text(client) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    for index, choice in enumerate(plain.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # the usage chunk comes last
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_stream_wire_format(server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"] is None


def test_stop_strings_end_the_text_as_the_engine_does(client, engine) -> None:
    text = engine.generate(PROMPT, max_new_tokens=16)[0].text
    stop = text[5:7]  # a string the greedy text is known to contain
    want = engine.generate(PROMPT, max_new_tokens=16, stop=(stop,))[0]
    assert want.finish_reason == "stop" and stop not in want.text
    for stop_field in (stop, [stop, "never-generated"]):
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop_field)
        assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_seeded_sampling_is_deterministic_and_matches_the_engine(client, engine) -> None:
    fields = dict(temperature=0.9, top_p=0.95, seed=1234)
    want = engine.generate(PROMPT, max_new_tokens=10, do_sample=True, top_k=40, **fields)[0]
    runs = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, extra_body={"top_k": 40}, **fields)
            for _ in range(2)]
    assert [r.choices[0].text for r in runs] == [want.text] * 2
    other = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, extra_body={"top_k": 40},
                                      **{**fields, "seed": 99})
    assert other.choices[0].text != want.text


def test_hayabusa_fields_reach_the_engine(client, engine) -> None:
    want = engine.generate(PROMPT, max_new_tokens=8, repetition_penalty=1.5, ignore_eos=True)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    assert got.choices[0].text == want.text
    assert want.text != engine.generate(PROMPT, max_new_tokens=8)[0].text  # the penalty changed something


def test_generate_options_reach_the_engine(client, engine) -> None:
    """transformers' generate options as hayabusa fields; beams come back best first as choices 0..n-1."""
    options = {"no_repeat_ngram_size": 2, "min_new_tokens": 4, "bad_words_ids": [[15, 16]], "eos_token_id": [3, 4]}
    want = engine.generate(PROMPT, max_new_tokens=8, **options)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=options)
    assert got.choices[0].text == want.text
    beams = {"num_beams": 3, "length_penalty": 0.5, "early_stopping": "never"}
    want = engine.generate(PROMPT, max_new_tokens=8, num_return_sequences=2, **beams)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2, extra_body=beams)
    assert [(c.index, c.text) for c in got.choices] == [(0, want[0].text), (1, want[1].text)]
    assert got.usage.completion_tokens == sum(len(out.token_ids) for out in want)
    texts = ["", ""]  # beams stream too: each choice's text arrives when the search ends
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2,
                                           stream=True, extra_body=beams):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [out.text for out in want]
    speculated = client.completions.create(model=MODEL, prompt=PROMPT * 3, max_tokens=12, temperature=0,
                                           extra_body={"prompt_lookup_num_tokens": 4})
    assert speculated.choices[0].text == engine.generate(PROMPT * 3, max_new_tokens=12)[0].text


# ---- logprobs, echo and n -----------------------------------------------------------------------------------------

def assert_logprobs(got, want, tolerance: float = 1e-6) -> None:
    """got: the wire's token_logprobs and top_logprobs values; want: the engine's TokenLogprobs (None: none)."""
    assert [None if w is None else pytest.approx(w.logprob, abs=tolerance) for w in want] == got.token_logprobs
    assert [None if w is None else [pytest.approx(lp, abs=tolerance) for _, lp in w.top] for w in want] == \
        [None if top is None else list(top.values()) for top in got.top_logprobs]


def test_logprobs_are_the_engines_in_openais_shape(client, engine) -> None:
    want = engine.generate(PROMPT, max_new_tokens=6, logprobs=3)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    (choice,) = got.choices
    logprobs = choice.logprobs  # the openai client's typed Logprobs
    assert_logprobs(logprobs, want.logprobs)
    assert logprobs.tokens == [engine.tokenizer.token_text(t) for t in want.token_ids]
    assert logprobs.text_offset == [len(engine.tokenizer.decode(want.token_ids[:i])) for i in range(6)]
    assert choice.text == want.text == "".join(logprobs.tokens)
    # Greedy: each token is the most likely one at its position.
    assert [max(top, key=top.get) for top in logprobs.top_logprobs] == logprobs.tokens


def test_echo_puts_the_prompt_and_its_logprobs_first(client, engine) -> None:
    want = engine.generate(PROMPT, max_new_tokens=3, logprobs=2, prompt_logprobs=2)[0]
    prompt_text, num_prompt = engine.tokenizer.decode(want.prompt_token_ids), len(want.prompt_token_ids)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    (choice,) = got.choices
    assert choice.text == prompt_text + want.text
    assert_logprobs(choice.logprobs, want.prompt_logprobs + want.logprobs)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.text_offset[num_prompt] == len(prompt_text)
    # max_tokens 0: only the prompt, scored (what evaluation harnesses send)
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)
    assert (scored.choices[0].text, scored.choices[0].finish_reason) == (prompt_text, "length")
    assert_logprobs(scored.choices[0].logprobs, [w if w is None else replace(w, top=w.top[:1])
                                                 for w in want.prompt_logprobs])
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (num_prompt, 0)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert (plain.choices[0].text, plain.choices[0].logprobs) == (prompt_text + want.text, None)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                              echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed), []) == choice.logprobs.token_logprobs


def test_n_completions_are_seeded_choices_in_plain_and_streamed_responses(client, engine, server) -> None:
    want = engine.generate(PROMPTS[:2], max_new_tokens=8, do_sample=True, temperature=0.9, seed=11,
                           num_return_sequences=3)
    fields = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0.9, seed=11, n=3)
    got = client.completions.create(**fields)
    assert [(c.index, c.text) for c in got.choices] == [(i, w.text) for i, w in enumerate(want)]  # i = prompt * n + j
    assert len({c.text for c in got.choices[:3]}) == 3  # three draws of one prompt
    assert [c.text for c in client.completions.create(**fields).choices] == [w.text for w in want]  # seeded
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want[::3])  # once per prompt
    chunks = list(client.completions.create(**fields, stream=True, logprobs=1))
    for index, w in enumerate(want):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.text for c in mine) == w.text and mine[-1].finish_reason == w.finish_reason
        assert len(sum((c.logprobs.tokens for c in mine), [])) == len(w.token_ids)
    server.wait_until_idle()  # every completion's blocks are back


# ---- the other routes -------------------------------------------------------------------------------------------

def test_models_health_and_chat(client, server) -> None:
    (card,) = client.models.list().data
    assert (card.id, card.object) == (MODEL, "model")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert_openai_error(response, 404, "/v1/completions", "chat template")
    assert_openai_error(httpx.get(f"{server.url}/v2/nothing"), 404, "/v2/nothing")
    assert_openai_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_metrics_count_requests_and_tokens(client, server) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    after = httpx.get(f"{server.url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "hayabusa_generation_tokens_total") - metric(before, "hayabusa_generation_tokens_total") == 5
    length = 'hayabusa_requests_total{finish_reason="length"}'
    assert metric(text, length) - metric(before, length) == 1
    assert metric(text, "hayabusa_time_to_first_token_seconds_count") - metric(
        before, "hayabusa_time_to_first_token_seconds_count") == 1
    assert metric(text, "hayabusa_inter_token_latency_seconds_count") - metric(
        before, "hayabusa_inter_token_latency_seconds_count") == 4
    assert metric(text, "hayabusa_kv_cache_blocks_total") == 64
    for gauge in ("hayabusa_num_requests_running", "hayabusa_num_requests_waiting", "hayabusa_kv_cache_blocks_in_use"):
        assert metric(text, gauge) == 0


# ---- bad requests: 400 in OpenAI's shape, and the server keeps serving -----------------------------------------------

@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": MODEL, "prompt": "a", "max_tokens": "5"}, "max_tokens", ["valid integer"]),
    ({"model": MODEL, "prompt": "a", "temperature": "hot"}, "temperature", ["valid number"]),
    ({"model": MODEL, "prompt": "a", "stream": "yes"}, "stream", ["valid boolean"]),
    ({"model": MODEL, "prompt": 5}, "prompt", ["list of token ids"]),
    ({"model": MODEL, "prompt": []}, "prompt", ["list of token ids"]),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt", ["list of token ids"]),
    ({"model": MODEL, "prompt": [1, True]}, "prompt", ["list of token ids"]),
    ({"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"model": MODEL, "prompt": "a", "max_tokens": -1}, "max_tokens", ["greater than or equal to 0"]),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens", ["max_tokens 0 needs echo"]),
    ({"model": MODEL, "prompt": "a", "n": 0}, "n", ["greater than or equal to 1"]),
    ({"model": MODEL, "prompt": "a", "n": 129}, "n", ["less than or equal to 128"]),
    ({"model": MODEL, "prompt": "a", "top_p": 1.5}, "top_p", ["less than or equal to 1"]),
    ({"model": MODEL, "prompt": "a", "logprobs": 21}, "logprobs", ["less than or equal to 20"]),
    ({"model": MODEL, "prompt": "a", "frobnicate": 1}, "frobnicate", ["unknown field 'frobnicate'"]),
    ({"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
     ["unknown field"]),
    ({"prompt": "a"}, "model", ["Field required"]),
    ({"model": MODEL, "prompt": "a", "num_beams": 0}, "num_beams", ["greater than or equal to 1"]),
    ({"model": MODEL, "prompt": "a", "early_stopping": "soon"}, "early_stopping", ["never"]),
    ({"model": MODEL, "prompt": "a", "bad_words_ids": [[1, "x"]]}, "bad_words_ids.0.1", ["valid integer"]),
    ({"model": MODEL, "prompt": "a", "min_p": 2}, "min_p", ["less than or equal to 1"]),
    ({"model": MODEL, "prompt": "a", "eos_token_id": [1, 2.5]}, "eos_token_id", ["list of token ids"]),
])
def test_malformed_fields_answer_400_naming_the_field(server, body, param, words) -> None:
    assert_openai_error(post(server, body), 400, *words, param=param)


def test_bodies_that_are_not_a_request_object(server) -> None:
    assert_openai_error(post(server, b'{"model": "tiny", "prompt": '), 400, "not valid JSON")
    assert_openai_error(post(server, b"[1, 2]"), 400, "must be a JSON object")
    assert_openai_error(post(server, b""), 400, "not valid JSON")


def test_requests_the_engine_cannot_run(server) -> None:
    """Errors name the fields the client sent: max_tokens and n, not the engine's max_new_tokens and
    num_return_sequences (before: those, with param null)."""
    long_prompt = list(range(1, 511))
    assert_openai_error(post(server, {"model": MODEL, "prompt": long_prompt, "max_tokens": 16}), 400,
                        "510 prompt tokens + max_tokens 16 = 526 exceed the context length 512", param="max_tokens")
    assert_openai_error(post(server, {"model": MODEL, "prompt": [[1, 2], long_prompt], "max_tokens": 16}), 400,
                        "prompt 1:", "context length 512", param="max_tokens")
    assert_openai_error(post(server, {"model": MODEL, "prompt": [[5, 99999]]}), 400, "99999", "vocabulary")
    assert_openai_error(post(server, {"model": MODEL, "prompt": ""}), 400, "empty")
    beams = {"model": MODEL, "prompt": "a", "num_beams": 2, "temperature": 0}
    assert_openai_error(post(server, {**beams, "n": 3}), 400, "n (3) must be <= num_beams (2)", param="n")
    assert_openai_error(post(server, {**beams, "logprobs": 1}), 400, "logprobs is not supported with num_beams > 1",
                        param="logprobs")
    assert_openai_error(post(server, {"model": MODEL, "prompt": "a", "eos_token_id": 99999}), 400,
                        "eos_token_id holds token id 99999 outside the vocabulary", param="eos_token_id")
    assert_openai_error(post(server, {**beams, "temperature": 1}), 400, "needs temperature 0", param="temperature")
    assert_openai_error(post(server, {"model": "gpt-4", "prompt": "a"}), 404, "'gpt-4' does not exist",
                        param="model")
    server.wait_until_idle()  # a refused prompt list leaves nothing queued
    assert post(server, {"model": MODEL, "prompt": "a", "max_tokens": 2}).status_code == 200


def test_null_fields_take_their_defaults(server) -> None:
    body = {"model": MODEL, "prompt": "a", "max_tokens": None, "temperature": None, "seed": None, "stop": None,
            "user": "someone"}
    response = post(server, body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16  # OpenAI's default
