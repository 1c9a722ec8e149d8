"""SamplingParams checks each value when it is made, naming the field."""

import pytest

from hayabusa.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.5, r"temperature must be a number in \[0, 3.402823e\+38\]"),
    # Floats the sampler holds in float32 are bounded by its range (past it they would silently become inf or 0).
    ("temperature", 1e300, r"temperature must be a number in \[0, 3.402823e\+38\] \(float32's largest"),
    ("repetition_penalty", 1e39, r"repetition_penalty must be > 0, in \[1.175494e-38, 3.402823e\+38\]"),
    ("repetition_penalty", 1e-300, r"repetition_penalty must be > 0, in \[1.175494e-38"),
    ("length_penalty", 1e300, r"length_penalty must be a number in \[-64, 64\]"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("max_new_tokens", -1, r"max_new_tokens must be an integer >= 0 \(0: only score the prompt\)"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("seed", -3, "seed must be a non-negative integer"),
    ("stop", ("",), "stop must hold non-empty strings"),
    ("num_return_sequences", 0, "num_return_sequences must be an integer >= 1"),
    ("logprobs", 21, r"logprobs must be None or an integer in \[0, 20\], got 21"),
    ("prompt_logprobs", True, r"prompt_logprobs must be None or an integer in \[0, 20\], got True"),
])
def test_bad_parameters_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
