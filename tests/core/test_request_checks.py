"""Where a request is checked, once, as it enters the engine: against the model (check_request) and against the
engine's pool and batch (check_capacity)."""

import pytest

from hayabusa.engine.core.request_checks import check_capacity, check_context_fits, check_request
from hayabusa.engine.sampling_params import SamplingParams

VOCAB = 100


def test_requests_that_can_never_run_are_refused() -> None:
    limits = dict(max_num_seqs=8, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_request([], SamplingParams(max_new_tokens=4), vocab_size=VOCAB, max_model_len=32)
    with pytest.raises(ValueError, match=r"30 prompt tokens \+ max_new_tokens 3 = 33 exceed the context length 32"):
        check_request([1] * 30, SamplingParams(max_new_tokens=3), vocab_size=VOCAB, max_model_len=32)
    with pytest.raises(ValueError, match="need 5 KV blocks of 4 tokens; the pool holds only 4"):
        check_capacity(14, SamplingParams(max_new_tokens=4), **limits)  # 14 + 4 - 1 = 17 cached tokens > 16 slots
    check_capacity(14, SamplingParams(max_new_tokens=3), **limits)  # 16 cached tokens: exactly the pool


def test_context_check_allows_exactly_the_context_and_names_both_counts():
    check_context_fits(60, 4, 64)  # the last position is 63: fits
    with pytest.raises(ValueError, match=r"^61 prompt tokens \+ max_new_tokens 4 = 65 exceed the context length 64 "
                                         r"\(max_position_embeddings\)$"):
        check_context_fits(61, 4, 64)
    with pytest.raises(ValueError, match=r"= 66 exceed the context length 64 \(max_position_embeddings\); "
                                         r"the prompt alone is longer than that$"):
        check_context_fits(65, 1, 64)
