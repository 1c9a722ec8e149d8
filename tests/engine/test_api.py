"""Engine generation on the reference backend: transformers' greedy tokens, batching, stopping, errors."""

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()


def make_engine(seed: int, **model_args) -> tuple[Engine, object]:
    hf, config, state_dict = random_hf_model(seed, **model_args)
    engine = Engine(config, state_dict, TOKENIZER, backend="reference", device=torch.device("cpu"))
    return engine, hf


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=hf.config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("rotary_pct", "tied"), [(1.0, True), (0.25, False)])
def test_greedy_tokens_equal_transformers_generate(rotary_pct: float, tied: bool) -> None:
    engine, hf = make_engine(21, rotary_pct=rotary_pct, tied=tied, vocab=211)
    prompts = [[5, 17, 99, 3, 42, 8, 150], [77, 1, 2]]
    outputs = engine.generate(prompts, max_new_tokens=20, do_sample=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = hf_greedy(hf, prompt, 20)
        if hf.config.eos_token_id in expected:  # transformers pads after eos; hayabusa stops
            expected = expected[: expected.index(hf.config.eos_token_id) + 1]
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] == hf.config.eos_token_id else "length")
        assert out.prompt_token_ids == prompt


def test_batch_of_different_lengths_equals_each_prompt_alone() -> None:
    engine, _ = make_engine(5, vocab=300)
    prompts = [[9, 8, 7], list(range(10, 30)), [250, 251, 2, 3, 4, 5, 6]]
    for params in (SamplingParams(max_new_tokens=12, ignore_eos=True),
                   SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.8, top_p=0.9,
                                  top_k=40, repetition_penalty=1.2, seed=1)):
        batched = engine.generate(prompts, params)
        for prompt, out in zip(prompts, batched, strict=True):
            alone = engine.generate([prompt], params)[0]
            assert out.token_ids == alone.token_ids
            assert out.text == alone.text
            assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_seeded_sampling_repeats_and_differs_by_seed() -> None:
    engine, _ = make_engine(8, vocab=400)
    args = dict(max_new_tokens=16, do_sample=True, temperature=1.5, ignore_eos=True)
    first = engine.generate([[1, 2, 3]], seed=123, **args)[0].token_ids
    assert engine.generate([[1, 2, 3]], seed=123, **args)[0].token_ids == first
    assert engine.generate([[1, 2, 3]], seed=124, **args)[0].token_ids != first


def test_eos_stops_unless_ignored() -> None:
    engine, hf = make_engine(13, vocab=120)
    eos = engine.config.eos_token_id
    # Make eos the clear argmax after any token by boosting its output embedding row.
    engine.reference.embed_out[eos] = engine.reference.final_ln_weight * 50
    out = engine.generate([[3, 4, 5]], max_new_tokens=8)[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    out = engine.generate([[3, 4, 5]], max_new_tokens=8, ignore_eos=True)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_stream_deltas_join_to_the_generated_text() -> None:
    engine, _ = make_engine(2, vocab=32000, hidden=32, heads=2, layers=1)
    text = "吾輩は猫である。"
    params = SamplingParams(max_new_tokens=25, do_sample=True, seed=3, ignore_eos=True)
    full = engine.generate(text, params)[0]
    deltas = list(engine.stream(text, params))
    assert "".join(deltas) == full.text
    assert full.prompt_token_ids == engine.tokenizer.encode(text)


def test_logits_equal_the_reference_forward() -> None:
    engine, hf = make_engine(4)
    input_ids = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(engine.logits(input_ids), hf(input_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("prompts", "kwargs", "message"), [
    ([""], {}, "prompt 0: the prompt is empty"),
    ([[]], {}, "prompt 0: the prompt is empty"),
    ([], {}, "prompts must be"),
    ([[1, 2], [1, 999999]], {}, "prompt 1: the prompt holds token id 999999 outside the vocabulary"),
    ([[1] * 129], {}, r"prompt 0: 129 prompt tokens \+ max_new_tokens 64 = 193 exceed the context length 128 "
                      r"\(max_position_embeddings\); the prompt alone is longer than that$"),
    ([[1, 2, 3]], {"max_new_tokens": 126}, r"prompt 0: 3 prompt tokens \+ max_new_tokens 126 = 129 exceed the "
                                           r"context length 128 \(max_position_embeddings\)$"),
    ([[1, 2, 3]], {"temperature": -1.0}, r"temperature must be a number in \[0, "),
    ([[1, 2, 3]], {"top_p": 0.0}, "top_p must be in"),
    ([[1, 2, 3]], {"beam_width": 3}, "unknown sampling parameter 'beam_width'"),
    ([[1, 2, 3]], {"num_beams": 2, "do_sample": True}, "do_sample=True is not supported with num_beams > 1"),
    (b"abc", {}, r"prompts is bytes; pass text as str \(e.g. data.decode\('utf-8'\)\) or token ids as a list of int"),
    ([b"abc"], {}, "prompt 0 is bytes"),  # bytes iterate as ints: they once passed for token ids [97, 98, 99]
    (["ok", bytearray(b"abc")], {}, "prompt 1 is bytearray"),
])
def test_bad_requests_get_clear_errors(prompts, kwargs, message: str) -> None:
    engine, _ = make_engine(1, vocab=101, max_positions=128)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, **kwargs)


def test_stream_refuses_beams() -> None:
    engine, _ = make_engine(1, vocab=101, max_positions=128)
    with pytest.raises(ValueError, match="num_beams > 1 does not stream"):
        next(engine.stream([1, 2, 3], num_beams=2))


def test_stream_refuses_bytes() -> None:
    engine, _ = make_engine(1, vocab=101, max_positions=128)
    with pytest.raises(ValueError, match="prompt 0 is bytes"):
        next(engine.stream(b"abc"))
