"""OpenAI's logit_bias, frequency_penalty and presence_penalty as device processors: logit_bias against transformers'
SequenceBiasLogitsProcessor (single-token sequences), the penalties (transformers has none) against OpenAI's formula
written out token by token, and the list-based sampler against the whole processing order written out by hand."""

import json
import math
import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import SequenceBiasLogitsProcessor

from hayabusa.engine.core.request_checks import check_request
from hayabusa.engine.oracle.reference_sampler import sample_next_tokens
from hayabusa.engine.sample.logits_processors import (
    MAX_LOGIT_BIAS,
    generated_counts,
    logit_bias_rows,
    padded_history,
    penalize_generated,
)
from hayabusa.engine.sample.seeds import gumbel_noise
from hayabusa.engine.sampling_params import SamplingParams

VOCAB = 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_logit_bias_rows_equal_sequence_bias() -> None:
    rng = random.Random(0)
    rows = 12
    biases = [{t: rng.uniform(-100, 100) for t in rng.sample(range(VOCAB), rng.randrange(0, 9))} for _ in range(rows)]
    biases[0] = {VOCAB - 1: 100.0, 0: -100.0}  # both ends of the vocabulary and of the range
    # Fixed-width rows whose entries past each row's count are stale (an earlier occupant's), as on the device.
    token_ids = torch.randint(0, VOCAB, (rows, MAX_LOGIT_BIAS))
    values = torch.randn(rows, MAX_LOGIT_BIAS) * 50
    for row, bias in enumerate(biases):
        token_ids[row, :len(bias)] = torch.tensor(list(bias), dtype=torch.int64)
        values[row, :len(bias)] = torch.tensor(list(bias.values()))
    logits = torch.randn(rows, VOCAB)
    actual = logits + logit_bias_rows(token_ids, values, torch.tensor([len(b) for b in biases]), VOCAB)
    for row, bias in enumerate(biases):
        expected = logits[row:row + 1]
        if bias:  # transformers refuses an empty sequence_bias
            processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])
            expected = processor(torch.zeros(1, 1, dtype=torch.long), expected.clone())
        assert torch.equal(actual[row], expected[0]), row
    assert sum(map(len, biases)) > 30


def test_penalties_follow_openais_formula_over_generated_tokens_only() -> None:
    rng = random.Random(1)
    rows = 16
    histories = [[rng.randrange(VOCAB // 4) for _ in range(rng.randrange(0, 30))] for _ in range(rows)]
    prompt_lengths = [rng.randrange(0, len(h) + 1) for h in histories]
    frequency = [rng.choice([0.0, 0.5, -1.25, 2.0]) for _ in range(rows)]
    presence = [rng.choice([0.0, 1.5, -2.0]) for _ in range(rows)]
    frequency[0], presence[0] = 0.0, 0.0  # off: not counted, unchanged
    counted = torch.tensor([f != 0 or p != 0 for f, p in zip(frequency, presence, strict=True)])
    history = padded_history(histories, 40, torch.device("cpu"))
    history[0, :] = -2  # an uncounted row's history may hold anything (here sentinels only)
    counts = generated_counts(history, torch.tensor(prompt_lengths), torch.tensor([len(h) for h in histories]),
                              counted, VOCAB)
    logits = torch.randn(rows, VOCAB) * 3
    actual = penalize_generated(logits, counts, torch.tensor(frequency), torch.tensor(presence))
    for row, tokens in enumerate(histories):
        generated = Counter(tokens[prompt_lengths[row]:]) if counted[row] else Counter()
        assert counts[row].tolist() == [float(generated[j]) for j in range(VOCAB)], row
        for j in range(VOCAB):
            expected = logits[row, j].item() - frequency[row] * generated[j] - presence[row] * (generated[j] > 0)
            assert math.isclose(actual[row, j].item(), expected, rel_tol=1e-6, abs_tol=1e-5), (row, j)
    assert torch.equal(actual[0], logits[0])
    assert sum(counts[row].sum() for row in range(rows)) > 50  # generated tokens do get counted


def written_out_logits(logits: torch.Tensor, params: SamplingParams, tokens: list[int], num_generated: int
                       ) -> list[float]:
    """The processing order of engine.sample.ops, token by token in float64: logit_bias, repetition penalty (prompt and
    generated tokens), frequency and presence penalties (generated tokens only)."""
    x = logits.double().tolist()
    for token, bias in params.logit_bias.items():
        x[token] += bias
    for token in set(tokens):
        x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    for token, count in Counter(tokens[len(tokens) - num_generated:]).items():
        x[token] -= params.frequency_penalty * count + params.presence_penalty
    return x


def test_list_sampler_applies_bias_then_penalties_then_temperature() -> None:
    rng = random.Random(2)
    rows = 32
    params, seen, steps = [], [], []
    for row in range(rows):
        tokens = [rng.randrange(VOCAB // 3) for _ in range(rng.randrange(1, 25))]
        seen.append(tokens)
        steps.append(rng.randrange(0, len(tokens) + 1))
        params.append(SamplingParams(
            do_sample=row % 2 == 1, temperature=rng.choice([0.5, 1.0, 1.7]), seed=row,
            repetition_penalty=rng.choice([1.0, 2.5]), frequency_penalty=rng.uniform(-2, 2),
            presence_penalty=rng.uniform(-2, 2),
            logit_bias={t: rng.uniform(-8, 8) for t in rng.sample(range(VOCAB // 2), rng.randrange(0, 8))}))
    logits = torch.randn(rows, VOCAB)
    seeds = list(range(100, 100 + rows))
    tokens = sample_next_tokens(logits, params, seen, seeds, steps).tolist()
    noise = gumbel_noise(torch.tensor(seeds), torch.tensor(steps), VOCAB).double()
    plain = sample_next_tokens(logits, [SamplingParams(do_sample=p.do_sample, temperature=p.temperature)
                                        for p in params], seen, seeds, steps).tolist()
    for row, p in enumerate(params):
        x = torch.tensor(written_out_logits(logits[row], p, seen[row], steps[row]), dtype=torch.float64)
        if p.do_sample:
            x = x / p.temperature + noise[row]
        assert x[tokens[row]] >= x.max() - 1e-4, row  # the written-out argmax (up to float32 rounding)
    assert sum(a != b for a, b in zip(tokens, plain, strict=True)) > rows // 3  # the options do change tokens


def test_bias_comes_before_and_frequency_after_the_repetition_penalty() -> None:
    """Where the order shows (greedy): token 0 is seen (prompt and generated once), token 1 is not."""
    logits = torch.tensor([[2.0, 1.9, -5.0], [2.0, 0.1, -5.0]])
    biased = SamplingParams(repetition_penalty=2.5, logit_bias={0: 2.0})  # (2 + 2) / 2.5 = 1.6 < 1.9
    penalized = SamplingParams(repetition_penalty=2.5, frequency_penalty=1.0)  # 2 / 2.5 - 1 = -0.2 < 0.1
    tokens = sample_next_tokens(logits, [biased, penalized], [[0, 0]] * 2, [0, 0], [1, 1])
    assert tokens.tolist() == [1, 1]  # the other orders would give 2 / 2.5 + 2 = 2.8 and (2 - 1) / 2.5 = 0.4


@pytest.mark.parametrize(("options", "message"), [
    ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": -2.01}, r"frequency_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": float("nan")}, r"frequency_penalty must be a number in \[-2, 2\]"),
    ({"presence_penalty": "1"}, r"presence_penalty must be a number"),
    ({"logit_bias": [(1, 2.0)]}, "logit_bias must be a dict of token id -> bias"),
    ({"logit_bias": {"5x": 1.0}}, r"logit_bias key '5x' is not a token id \(an integer >= 0, or its decimal string\)"),
    ({"logit_bias": {"-5": 1.0}}, "logit_bias key '-5' is not a token id"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias key -1 is not a token id"),
    ({"logit_bias": {True: 1.0}}, "logit_bias key True is not a token id"),
    ({"logit_bias": {7: 100.5}}, r"logit_bias\[7\] must be a number in \[-100, 100\], got 100.5"),
    ({"logit_bias": {"7": "1"}}, r"logit_bias\['7'\] must be a number in \[-100, 100\], got '1'"),
    ({"logit_bias": {7: float("inf")}}, r"logit_bias\[7\] must be a number in \[-100, 100\]"),
    ({"logit_bias": dict.fromkeys(range(MAX_LOGIT_BIAS + 1), 1.0)}, "logit_bias holds 301 entries; at most 300"),
    ({"best_of": 0}, r"best_of must be None or an integer >= num_return_sequences \(1\)"),
    ({"best_of": 2, "num_return_sequences": 3}, r"best_of must be None or an integer >= num_return_sequences \(3\)"),
    ({"best_of": True}, "best_of must be None or an integer"),
    ({"best_of": 3, "do_sample": True, "prompt_lookup_num_tokens": 4},
     "best_of > num_return_sequences is not supported with prompt_lookup_num_tokens"),
])
def test_bad_openai_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_logit_bias_is_a_private_dict_of_floats_checked_against_the_vocabulary() -> None:
    given = {9: 3, 2: -1.5}
    params = SamplingParams(logit_bias=given)
    given[9] = 50
    assert params.logit_bias == {2: -1.5, 9: 3.0} and all(type(v) is float for v in params.logit_bias.values())
    assert hash(params) == hash(SamplingParams(logit_bias={1: 1.0}))  # hashable; logit_bias takes no part in it
    assert params != SamplingParams() and params == SamplingParams(logit_bias={2: -1.5, 9: 3})
    assert SamplingParams(**json.loads('{"logit_bias": {"9": 3, "2": -1.5}}')) == params  # JSON's string keys
    with pytest.raises(ValueError, match=r"logit_bias holds token id 40 outside the vocabulary \[0, 40\)"):
        check_request([1], SamplingParams(logit_bias={3: 1, 40: 1}), vocab_size=VOCAB, max_model_len=64)


def test_which_requests_need_the_processors_and_how_many_candidates_run() -> None:
    defaults = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1}
    assert not SamplingParams(**defaults).needs_processors
    assert SamplingParams(**defaults).num_candidates == 1 and not SamplingParams(**defaults).wants_token_logprobs
    for options in ({"presence_penalty": -0.1}, {"frequency_penalty": 2}, {"logit_bias": {3: 0.0}}):
        assert SamplingParams(**options).needs_processors, options
    assert SamplingParams(presence_penalty=1).needs_history and not SamplingParams(logit_bias={3: 1}).needs_history
    sampled = SamplingParams(do_sample=True, best_of=5, num_return_sequences=2)
    assert (sampled.num_candidates, sampled.ranks_candidates, sampled.wants_token_logprobs) == (5, True, True)
    greedy = SamplingParams(best_of=5, num_return_sequences=2)  # identical candidates: only the n returned run
    assert (greedy.num_candidates, greedy.ranks_candidates) == (2, False)
