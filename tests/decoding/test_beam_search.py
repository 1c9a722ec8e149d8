"""Beam search (engine.decoding.beam_search, engine.oracle.reference_beams) against transformers'
generate(num_beams=k), fp32."""

import math

import pytest
import torch

from hayabusa.engine.decoding.beam_search import BeamSearch, beam_logprobs, topk_lower_index_on_ties
from hayabusa.engine.oracle.reference_beams import reference_beam_outputs
from hayabusa.engine.oracle.reference_generate import reference_generate, reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENIZER = Tokenizer.from_pretrained()
EOS = 100  # random_hf_model's eos id with vocab 101
PROMPT = [5, 17, 42, 8]


def eos_prone_model(seed: int, eos_weight: float):
    """A random model whose eos logit is eos_weight * (3 + a normalized hidden feature): likely enough that beams end
    at different steps. Returns (transformers model, our reference model)."""
    hf, config, state_dict = random_hf_model(seed, tied=False)
    with torch.no_grad():
        hf.gpt_neox_japanese.final_layer_norm.bias[0] = 3.0
        hf.embed_out.weight[EOS] = 0.0
        hf.embed_out.weight[EOS, 0] = eos_weight
    state_dict = {name: tensor.detach().clone() for name, tensor in hf.state_dict().items()}
    return hf, ReferenceModel(config, state_dict)


@pytest.fixture(scope="module")
def models():
    hf, config, state_dict = random_hf_model(0)
    return {"plain": (hf, ReferenceModel(config, state_dict)), "eos": eos_prone_model(0, 0.7),
            "eos1": eos_prone_model(1, 0.8)}


def hf_beams(hf, prompts: list[list[int]], **kwargs) -> list[list[tuple[list[int], float]]]:
    """transformers' beams per prompt (left-padded batch): (generated tokens, sequences_scores), best first."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=EOS,
                      return_dict_in_generate=True, output_scores=True, **kwargs)
    lengths = (out.beam_indices >= 0).sum(-1).tolist()  # generated tokens per returned sequence
    n = kwargs["num_return_sequences"]
    rows = [(out.sequences[i, longest:longest + lengths[i]].tolist(), float(out.sequences_scores[i]))
            for i in range(len(prompts) * n)]
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


def assert_same_beams(ours, theirs) -> None:
    assert [out.token_ids for out in ours] == [tokens for tokens, _ in theirs]
    for out, (_, score) in zip(ours, theirs, strict=True):
        assert math.isclose(out.score, score, rel_tol=1e-5), (out.score, score)


CASES = [  # (model, num_beams, length_penalty, early_stopping, num_return_sequences)
    ("plain", 2, 1.0, False, 2),
    ("plain", 4, 1.0, False, 4),
    ("eos", 4, 1.0, False, 4),
    ("eos", 4, 0.0, False, 4),
    ("eos", 4, 2.0, "never", 4),
    ("eos", 4, -1.0, True, 4),
    ("eos", 3, 1.0, "never", 2),
    ("eos", 4, 2.0, True, 1),
    ("eos1", 4, 1.0, False, 4),
    ("eos1", 2, -1.0, "never", 2),
    ("eos1", 4, 0.0, True, 3),
]


@pytest.mark.parametrize(("model", "num_beams", "length_penalty", "early_stopping", "n"), CASES)
def test_beams_equal_transformers(models, model: str, num_beams: int, length_penalty: float,
                                  early_stopping: bool | str, n: int) -> None:
    hf, reference = models[model]
    options = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                   num_return_sequences=n, max_new_tokens=10)
    ours = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(**options))
    (theirs,) = hf_beams(hf, [PROMPT], **options)
    assert_same_beams(ours, theirs)
    assert [out.finish_reason for out in ours] == ["stop" if out.token_ids[-1] == EOS else "length" for out in ours]


def test_eos_prone_models_end_beams_at_different_steps(models) -> None:
    """The eos cases above test what they claim: hypotheses end on eos at several lengths, some run to the limit."""
    lengths, reasons = set(), set()
    for model, num_beams, length_penalty, early_stopping, n in CASES:
        if model != "plain":
            params = SamplingParams(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                                    num_return_sequences=n, max_new_tokens=10)
            for out in reference_beam_outputs(models[model][1], TOKENIZER, PROMPT, params):
                lengths.add(len(out.token_ids))
                reasons.add(out.finish_reason)
    assert reasons == {"stop", "length"} and len(lengths) >= 4, (reasons, lengths)


def test_repetition_penalty_applies_to_each_beams_own_tokens(models) -> None:
    hf, reference = models["plain"]
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8, repetition_penalty=1.5)
    ours = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(**options))
    (theirs,) = hf_beams(hf, [PROMPT], **options, length_penalty=1.0, early_stopping=False)
    assert_same_beams(ours, theirs)
    plain = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(num_beams=3, max_new_tokens=8))
    assert plain[0].token_ids != ours[0].token_ids  # the penalty changed something


@pytest.mark.parametrize("options", [
    {"no_repeat_ngram_size": 1}, {"bad_words_ids": [[49], [13, 74]]}, {"min_new_tokens": 8},
    {"no_repeat_ngram_size": 1, "bad_words_ids": [[EOS]], "repetition_penalty": 1.3}])
def test_logits_processors_act_on_each_beams_log_probabilities(models, options) -> None:
    """transformers runs its processors on the log-probabilities in beam search, per beam on its own tokens."""
    hf, reference = models["eos"]
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8, **options)
    params = SamplingParams(**options)
    ours = reference_beam_outputs(reference, TOKENIZER, PROMPT, params)
    (theirs,) = hf_beams(hf, [PROMPT], **options, length_penalty=1.0, early_stopping=False)
    assert_same_beams(ours, theirs)
    plain = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(num_beams=3, num_return_sequences=3,
                                                                                max_new_tokens=8))
    assert [out.token_ids for out in plain] != [out.token_ids for out in ours]  # the option changed something


def test_logit_bias_acts_on_beams_like_sequence_bias(models) -> None:
    """OpenAI's logit_bias is transformers' sequence_bias of single tokens, added to each beam's log-probabilities
    before the repetition penalty (transformers' order)."""
    hf, reference = models["eos"]
    bias = {13: 1.5, 49: -2.0, EOS: -1.0}
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8, repetition_penalty=1.3)
    ours = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(logit_bias=bias, **options))
    (theirs,) = hf_beams(hf, [PROMPT], **options, sequence_bias=[[[token], value] for token, value in bias.items()],
                         length_penalty=1.0, early_stopping=False)
    assert_same_beams(ours, theirs)
    plain = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(**options))
    assert [out.token_ids for out in plain] != [out.token_ids for out in ours]


def test_batch_of_prompts_gives_each_prompts_beams_consecutively(models) -> None:
    """Two prompts of different lengths (left-padded in transformers) and a greedy request in one call."""
    hf, reference = models["eos"]
    prompts = [PROMPT, [9, 3, 77, 12, 60, 2, 31]]
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=9, length_penalty=1.0, early_stopping=False)
    theirs = hf_beams(hf, prompts, **options)
    params = SamplingParams(**options)
    greedy = SamplingParams(max_new_tokens=9)
    ours = reference_outputs(reference, TOKENIZER, [prompts[0], PROMPT, prompts[1]], [params, greedy, params])
    assert [out.prompt_token_ids for out in ours] == [prompts[0]] * 2 + [PROMPT] + [prompts[1]] * 2
    assert_same_beams(ours[:2], theirs[0])
    assert_same_beams(ours[3:], theirs[1])
    assert ours[2].score is None and ours[2].token_ids == reference_outputs(reference, TOKENIZER, [PROMPT],
                                                                            [greedy])[0].token_ids


def test_one_beam_is_greedy(models) -> None:
    _, reference = models["eos"]
    beam = reference_beam_outputs(reference, TOKENIZER, PROMPT, SamplingParams(num_beams=1, max_new_tokens=10))
    (greedy,) = reference_outputs(reference, TOKENIZER, [PROMPT], [SamplingParams(max_new_tokens=10)])
    assert beam[0].token_ids == greedy.token_ids and greedy.finish_reason == "stop"


# The scorer on hand-made log-probabilities (vocab 5, eos id 4).

def logprobs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_first_step_picks_from_the_prompt_row_only() -> None:
    search = BeamSearch(2, 5, [4])
    step = search.step(logprobs([-1.0, -0.5, -3.0, -2.0, -9.0]))
    assert step == ([0, 0], [1, 0], False)
    with pytest.raises(ValueError, match="step 1 takes logprobs of 2 rows, got 1"):
        search.step(logprobs([-1.0] * 5))


def test_ties_go_to_the_lower_beam_then_the_lower_token() -> None:
    search = BeamSearch(2, 5, [4])
    search.step(logprobs([-1.0, -1.0, -5.0, -5.0, -9.0]))  # two beams at -1.0: tokens 0 then 1
    step = search.step(logprobs([-9.0, -2.0, -9.0, -2.0, -9.0], [-9.0, -2.0, -2.0, -9.0, -9.0]))
    # four candidates at -3.0: (beam 0, token 1), (0, 3), (1, 1), (1, 2); the first two go on
    assert step == ([0, 0], [1, 3], False)


def test_eos_ranked_below_num_beams_is_a_spare_not_a_hypothesis() -> None:
    search = BeamSearch(2, 2, [4])
    step = search.step(logprobs([-1.0, -1.5, -5.0, -5.0, -2.0]))  # eos is the third candidate of four
    assert step == ([0, 0], [0, 1], False)
    step = search.step(logprobs([-3.5, -9.0, -9.0, -9.0, -9.0], [-3.5, -9.0, -9.0, -9.0, -9.0]))
    assert step.done  # max_new_tokens 2: the top two candidates finish by length at -4.5 / 2 and -5.0 / 2
    # had the first step's eos (-2.0 / 1) been kept, it would come first
    assert [(h.token_ids, h.score, h.ended_on_eos) for h in search.results()] == [([0, 0], -2.25, False),
                                                                                  ([1, 0], -2.5, False)]


def test_each_eos_id_adds_num_beams_candidates_so_k_beams_keep_running() -> None:
    search = BeamSearch(2, 5, [3, 4], length_penalty=2.0, early_stopping="never")
    assert search.num_candidates == 6
    search.step(logprobs([-1.0, -1.1, -9.0, -9.0, -9.0]))
    step = search.step(logprobs([-5.0, -6.0, -7.0, -0.1, -0.2], [-5.0, -6.0, -7.0, -0.1, -0.2]))
    # the four best candidates end on eos (two become hypotheses); the running beams are the next two. "never" with
    # length_penalty 2 bounds them at max_new_tokens: -6.0 / 5**2 > -1.2 / 2**2, so the search goes on.
    assert step == ([0, 1], [0, 0], False)


def test_all_hypotheses_held_ends_with_early_stopping_and_results_come_best_first() -> None:
    search = BeamSearch(2, 5, [4], early_stopping=True)
    search.step(logprobs([-1.0, -2.0, -5.0, -5.0, -9.0]))  # beams: [0] at -1, [1] at -2
    step = search.step(logprobs([-5.0, -5.0, -5.0, -5.0, -0.5], [-5.0, -5.0, -5.0, -5.0, -0.1]))
    # candidates: (0, eos) -1.5, (1, eos) -2.1: both among the top 2, both finish; 2 held and early_stopping ends it
    assert step.done
    results = search.results()
    assert [(h.token_ids, h.ended_on_eos) for h in results] == [([0, 4], True), ([1, 4], True)]
    assert [h.score for h in results] == pytest.approx([-1.5 / 2, -2.1 / 2])
    with pytest.raises(RuntimeError, match="after the beam search finished"):
        search.step(logprobs([0.0] * 5, [0.0] * 5))


@pytest.mark.parametrize("early_stopping", [True, False])
def test_early_stopping_false_goes_on_while_a_running_beam_could_still_win(early_stopping: bool) -> None:
    search = BeamSearch(2, 4, [4], early_stopping=early_stopping)
    search.step(logprobs([-1.0, -1.1, -5.0, -5.0, -9.0]))
    step = search.step(logprobs([-0.1, -9.0, -9.0, -9.0, -0.3], [-9.0] * 5))
    assert step == ([0, 0], [0, 1], False)  # (0, eos) ranked second: hypothesis [0, eos] at -1.3 / 2
    step = search.step(logprobs([-0.1, -9.0, -9.0, -9.0, -0.2], [-9.0] * 5))
    # hypothesis [0, 0, eos] at -1.3 / 3 makes two; the running [0, 0, 0] at -1.2 could reach -1.2 / 3 > -1.3 / 2
    assert step.done is early_stopping
    if not early_stopping:
        assert search.step(logprobs([-0.05, -9.0, -9.0, -9.0, -9.0], [-9.0] * 5)).done  # max_new_tokens
    results = [(h.token_ids, h.score) for h in search.results()]
    expected = [([0, 0, 4], -1.3 / 3), ([0, 4], -1.3 / 2)] if early_stopping else [([0, 0, 0, 0], -1.25 / 4),
                                                                                  ([0, 0, 4], -1.3 / 3)]
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in expected]
    assert [score for _, score in results] == pytest.approx([score for _, score in expected])


def test_topk_lower_index_on_ties_orders_like_a_stable_sort() -> None:
    values = torch.tensor([-0.0, 0.0, -1.0, 2.5, -math.inf, 2.5, -1.0, 1e-30, -1e-30, -1e9, 3e38, -3e38])
    top, index = topk_lower_index_on_ties(values, len(values))
    expected = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    assert index.tolist() == expected and top.tolist() == values[expected].tolist()


def test_beam_logprobs_penalize_log_probabilities_not_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    params = SamplingParams(num_beams=2, repetition_penalty=2.0)
    expected = torch.log_softmax(logits, -1) * torch.tensor([2.0, 1.0, 2.0])  # every log-probability is < 0
    torch.testing.assert_close(beam_logprobs(logits, params, [[0, 2]], 0, None), expected)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_beams": 0}, "num_beams must be an integer >= 1"),
    ({"num_beams": 2, "num_return_sequences": 3}, r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    ({"num_beams": 2, "do_sample": True}, "do_sample=True is not supported with num_beams > 1: beam sampling"),
    ({"num_beams": 2, "logprobs": 1}, "logprobs is not supported with num_beams > 1"),
    ({"num_beams": 2, "prompt_logprobs": 1}, "prompt_logprobs is not supported with num_beams > 1"),
    ({"num_beams": 2, "stop": "。"}, "stop is not supported with num_beams > 1"),
    ({"num_beams": 2, "max_new_tokens": 0}, "max_new_tokens=0 is not supported with num_beams > 1"),
    ({"early_stopping": "always"}, "early_stopping must be True, False or 'never'"),
    ({"length_penalty": math.nan}, r"length_penalty must be a number in \[-64, 64\]"),
])
def test_sampling_params_refuse_what_beams_do_not_support(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_reference_stream_refuses_beams(models) -> None:
    with pytest.raises(ValueError, match="beam search does not stream"):
        next(reference_generate(models["plain"][1], TOKENIZER, [PROMPT], [SamplingParams(num_beams=2)]))
