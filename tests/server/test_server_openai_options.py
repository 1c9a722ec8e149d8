"""OpenAI's completion fields that clients built on the openai library send by default (presence_penalty,
frequency_penalty, logit_bias, best_of, suffix): accepted at their defaults, carried to the engine, and refused in
OpenAI's error shape naming the field. Outputs are compared with `Engine.generate` on the same weights."""

import openai
import pytest

from hayabusa.engine import Engine
from hayabusa.engine.sample.logits_processors import MAX_LOGIT_BIAS
from hayabusa.engine.sample.seeds import completion_seed

from server_harness import MODEL, assert_openai_error, post, running_server

PROMPT = "吾輩は猫である。名前はまだ無い。"


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


def test_default_filled_fields_equal_the_plain_call(client) -> None:
    defaults = dict(presence_penalty=0, frequency_penalty=0, logit_bias={}, best_of=1, suffix=None)
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 3, "n": 2, "logprobs": 1}):
        plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, **sampling)
        if "n" in sampling:
            defaults["best_of"] = 2  # best_of must cover n
        filled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, **sampling, **defaults)
        assert [choice.model_dump() for choice in filled.choices] == [choice.model_dump() for choice in plain.choices]
        assert filled.usage == plain.usage


def test_penalties_and_logit_bias_reach_the_engine(client, engine) -> None:
    options = dict(presence_penalty=0.8, frequency_penalty=1.2)
    want = engine.generate(PROMPT, max_new_tokens=12, logit_bias={15: 3.0, 7: -100.0}, **options)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    logit_bias={"15": 3, "7": -100}, **options)
    assert got.choices[0].text == want.text
    assert want.text != engine.generate(PROMPT, max_new_tokens=12)[0].text  # the options changed something
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=1, logprobs=0,
                                       logit_bias={"15": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == engine.tokenizer.decode([15] * 6)
    assert forced.choices[0].logprobs.tokens == [engine.tokenizer.convert_ids_to_tokens(15)] * 6


def test_best_of_returns_the_n_best_candidates_by_summed_logprob(client, engine) -> None:
    sampling = dict(temperature=0.9, seed=5)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, best_of=4, logprobs=0, **sampling)
    candidates = [engine.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, logprobs=0,
                                  seed=completion_seed(5, j))[0] for j in range(4)]
    ranked = sorted(candidates, key=lambda out: -sum(entry.logprob for entry in out.logprobs))
    assert [(c.index, c.text) for c in got.choices] == [(0, ranked[0].text), (1, ranked[1].text)]
    sums = [sum(c.logprobs.token_logprobs) for c in got.choices]
    assert sums[0] >= sums[1] and len({out.text for out in candidates}) == 4
    assert got.usage.completion_tokens == sum(len(out.token_ids) for out in ranked[:2])  # the returned choices'
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, best_of=3, stream=True)
    assert refused.value.body["param"] == "best_of" and "cannot stream" in refused.value.body["message"]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"suffix": "。"}, "suffix", ["not supported for this model"]),
    ({"logit_bias": {"abc": 1}}, "logit_bias", ["key 'abc' is not a token id"]),
    ({"logit_bias": {"-5": 1}}, "logit_bias", ["key '-5' is not a token id"]),
    ({"logit_bias": {"5": 101}}, "logit_bias", ["[-100, 100]", "101"]),
    ({"logit_bias": {"5": "1"}}, "logit_bias", ["[-100, 100]"]),
    ({"logit_bias": {"5": True}}, "logit_bias", ["[-100, 100]"]),
    ({"logit_bias": [5]}, "logit_bias", ["must be an object"]),
    ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", ["at most 300"]),
    ({"logit_bias": {"3": 1, "999999": 1}}, "logit_bias", ["key '999999' is not a token id of this model"]),
    ({"presence_penalty": 2.5}, "presence_penalty", ["less than or equal to 2"]),
    ({"frequency_penalty": -3}, "frequency_penalty", ["greater than or equal to -2"]),
    ({"frequency_penalty": "0"}, "frequency_penalty", ["valid number"]),
    ({"best_of": 0}, "best_of", ["greater than or equal to 1"]),
    ({"best_of": 1, "n": 2}, "best_of", ["best_of (1) must be >= n (2)"]),
    ({"best_of": 2, "stream": True}, "best_of", ["cannot stream"]),
])
def test_bad_openai_fields_answer_400_naming_the_field(server, fields, param, words) -> None:
    assert_openai_error(post(server, {"model": MODEL, "prompt": "a", **fields}), 400, *words, param=param)
