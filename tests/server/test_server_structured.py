"""Structured outputs over HTTP, driven by the official openai client: vLLM's structured_outputs, its older guided_*
fields and OpenAI's response_format constrain the completion (plain and streamed, n > 1); a bad schema or regex is a
400 naming the field before any decoding; a choice cut short by max_tokens says so."""

import json
import re

import jsonschema
import openai
import pytest

from server_harness import MODEL, assert_openai_error, post, running_server
from structured_cases import CHOICES, MAX_NEW_TOKENS, REGEX, SCHEMA


@pytest.fixture(scope="module")
def server():
    with running_server(kv_cache_blocks=64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, max_tokens: int, **body):
    return client.completions.create(model=MODEL, prompt="東京", max_tokens=max_tokens, temperature=0.9, seed=1,
                                     extra_body=body.pop("extra_body", {}), **body)


def test_each_field_constrains_the_completion(client) -> None:
    response = complete(client, MAX_NEW_TOKENS["json"], n=3, extra_body={"structured_outputs": {"json": SCHEMA}})
    for choice in response.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
        assert choice.finish_reason == "stop" and choice.model_extra["structured_output_complete"] is True
    # The client's completions.create has no response_format parameter (chat's has): it travels in the body.
    response = complete(client, MAX_NEW_TOKENS["json"], extra_body={"response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}})
    jsonschema.validate(json.loads(response.choices[0].text), SCHEMA)
    json_object = complete(client, 60, extra_body={"response_format": {"type": "json_object"}, "top_k": 5})
    if json_object.choices[0].finish_reason == "stop":  # any object: unbounded, so it may run out of max_tokens
        assert isinstance(json.loads(json_object.choices[0].text), dict)
    assert json_object.choices[0].text.startswith("{")
    for body, kind in (({"guided_regex": REGEX}, "regex"), ({"guided_choice": list(CHOICES)}, "choice"),
                       ({"guided_json": SCHEMA}, "json")):
        choice = complete(client, MAX_NEW_TOKENS[kind], extra_body=body).choices[0]
        assert choice.finish_reason == "stop" and choice.model_extra["structured_output_complete"] is True
        if kind == "regex":
            assert re.fullmatch(REGEX, choice.text)
        elif kind == "choice":
            assert choice.text in CHOICES


def test_a_stream_keeps_to_the_constraint(client) -> None:
    chunks = list(complete(client, MAX_NEW_TOKENS["json"], stream=True,
                           extra_body={"structured_outputs": {"json": SCHEMA}}))
    text = "".join(chunk.choices[0].text for chunk in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].model_extra["structured_output_complete"] is True


def test_cut_short_by_max_tokens_says_so(client) -> None:
    choice = complete(client, 3, extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0]
    assert choice.finish_reason == "length" and choice.model_extra["structured_output_complete"] is False
    plain = complete(client, 3).choices[0]
    assert plain.model_extra["structured_output_complete"] is None


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", ["structured_outputs.regex is invalid",
                                                                      "unclosed group"]),
    ({"guided_json": {"type": "strin"}}, "guided_json", ["Invalid type: strin"]),
    ({"structured_outputs": {"grammar": 'root ::= ("a"'}}, "structured_outputs", ["grammar is invalid"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one of"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, None, ["guided_choice and guided_regex each constrain"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ['needs "json_schema"']),
    ({"response_format": {"type": "yaml"}}, "response_format.type", []),
    ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos", ["not supported with structured"]),
    ({"temperature": 1e39}, "temperature", []),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", []),
])
def test_bad_constraints_and_floats_are_400s_naming_the_field(server, body, param, words) -> None:
    response = post(server, {"model": MODEL, "prompt": "東京", "max_tokens": 4, **body})
    assert_openai_error(response, 400, *words, param=param)
