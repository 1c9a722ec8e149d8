"""StructuredOutputs is checked when made: exactly one constraint, and a schema, regex or grammar the grammar engine
accepts (ValueError naming the field and the problem, before any decoding); the request fields that carry it."""

import pytest

from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.structured_outputs import StructuredOutputs, from_request_fields


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "needs exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"regex": "a(b"}, r"(?s)structured_outputs.regex is invalid: .*unclosed group"),
    ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "structured_outputs.json is invalid: "
                                                                            "Invalid type: strin"),
    ({"json": '{"type": '}, "structured_outputs.json is not valid JSON"),
    ({"json": [1]}, "structured_outputs.json must be a JSON schema"),
    ({"choice": []}, "choice must be a non-empty list of non-empty strings"),
    ({"choice": ["a", ""]}, "choice must be a non-empty list of non-empty strings"),
    ({"grammar": 'root ::= ( "a"'}, r"(?s)structured_outputs.grammar is invalid: .*Expected '\)'"),
    ({"json_object": True, "disable_any_whitespace": "yes"}, "disable_any_whitespace must be true or false"),
])
def test_bad_constraints_are_named(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputs(**fields)


def test_sampling_params_take_a_dict_and_refuse_what_cannot_keep_a_constraint() -> None:
    params = SamplingParams(structured_outputs={"choice": ["はい", "いいえ"]})
    assert params.structured_outputs == StructuredOutputs(choice=("はい", "いいえ"))
    assert hash(params) == hash(SamplingParams(structured_outputs=StructuredOutputs(choice=["はい", "いいえ"])))
    with pytest.raises(ValueError, match="unknown field 'guided_regex'"):
        SamplingParams(structured_outputs={"guided_regex": "a"})
    with pytest.raises(ValueError, match="ignore_eos is not supported with structured_outputs"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens is not supported with structured_outputs"):
        SamplingParams(prompt_lookup_num_tokens=3, structured_outputs={"regex": "a"})


def test_the_request_fields_that_carry_a_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert from_request_fields({}) is None
    assert from_request_fields({"response_format": {"type": "text"}}) is None
    assert from_request_fields({"structured_outputs": {"regex": "[0-9]"}}) == StructuredOutputs(regex="[0-9]")
    assert from_request_fields({"guided_choice": ["a", "b"]}) == StructuredOutputs(choice=("a", "b"))
    assert from_request_fields({"guided_json": schema}) == StructuredOutputs(json=schema)
    assert from_request_fields({"guided_grammar": 'root ::= "a"'}) == StructuredOutputs(grammar='root ::= "a"')
    assert from_request_fields({"response_format": {"type": "json_object"}}) == StructuredOutputs(json_object=True)
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert from_request_fields({"response_format": spec}) == StructuredOutputs(json=schema)
    with pytest.raises(ValueError, match="guided_regex and response_format each constrain the output"):
        from_request_fields({"guided_regex": "a", "response_format": {"type": "json_object"}})
    with pytest.raises(ValueError, match='needs "json_schema"'):
        from_request_fields({"response_format": {"type": "json_schema"}})
