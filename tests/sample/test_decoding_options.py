"""transformers' generate options on the paged engine: equal to `transformers.generate` where its result is
deterministic (greedy), and to the reference loop (same seeded draws) where it samples; through batching, slot moves
and preemption, and on both op sets. The sampling options' masks are checked in test_logits_processors.
"""

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from devices import DEVICE
from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()
PROMPTS = [[5, 17, 9, 3, 5, 17], [40, 41, 42], [7, 7, 7, 8], [30, 2, 33, 30, 2]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    """A random model that says eos (id 52) early: its output row leans on the two tokens it favours most."""
    hf, config, state_dict = random_hf_model(21, vocab=53, tied=False)
    with torch.no_grad():
        hf.embed_out.weight[52] = 0.6 * (hf.embed_out.weight[15] + hf.embed_out.weight[31])
    state_dict["embed_out.weight"] = hf.embed_out.weight.detach().clone()
    return hf, config, state_dict


def hf_generate(hf, prompt: list[int], max_new_tokens: int, **options) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **options)[0, len(prompt):]
    tokens = out.tolist()
    eos = options.get("eos_token_id", hf.config.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    stops = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: stops[0] + 1] if stops else tokens  # transformers pads after eos; hayabusa stops


GREEDY_OPTIONS = [
    {},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 1, "min_new_tokens": 3},
    {"bad_words_ids": [[15], [52], [31, 31, 31], [23, 23], [44, 44]]},  # [52] is eos: transformers keeps it
    {"min_new_tokens": 5},
    {"eos_token_id": [40, 18], "min_new_tokens": 2},
    {"no_repeat_ngram_size": 3, "bad_words_ids": [[40, 40, 40]], "repetition_penalty": 1.3},
]


def test_greedy_options_equal_transformers_generate(model) -> None:
    hf, config, state_dict = model
    engine = PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", kv_cache_blocks=64, block_size=4)
    params = [SamplingParams(max_new_tokens=14, **options) for options in GREEDY_OPTIONS for _ in PROMPTS]
    prompts = PROMPTS * len(GREEDY_OPTIONS)
    outputs = engine.generate(prompts, params)  # every option in one batch: the rows keep their own settings
    for prompt, options, out in zip(prompts, [o for o in GREEDY_OPTIONS for _ in PROMPTS], outputs, strict=True):
        expected = hf_generate(hf, prompt, 14, **options)
        assert out.token_ids == expected, (prompt, options)
    by_option = [[o.token_ids for o in outputs[i: i + len(PROMPTS)]] for i in range(0, len(outputs), len(PROMPTS))]
    assert all(tokens != by_option[0] for tokens in by_option[1:])  # every option changes some output
    assert any(len(tokens) < 5 for tokens in by_option[0])  # eos comes early, so min_new_tokens has work to do


def test_options_survive_slot_moves_and_preemption_and_match_the_reference_loop(model) -> None:
    _, config, state_dict = model
    sampled = dict(do_sample=True, temperature=1.3, seed=5, ignore_eos=True)
    params = [SamplingParams(max_new_tokens=12, no_repeat_ngram_size=2, min_p=0.1, **sampled),
              SamplingParams(max_new_tokens=3),  # finishes first: the others move slots
              SamplingParams(max_new_tokens=12, typical_p=0.6, bad_words_ids=[[3, 5], [9]], **sampled),
              SamplingParams(max_new_tokens=10, min_new_tokens=9, no_repeat_ngram_size=1),
              SamplingParams(max_new_tokens=12, top_k=5, min_p=0.05, typical_p=0.9, **sampled)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2], PROMPTS[0] * 2]
    expected = reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts, params)
    # 12 blocks of 4 tokens for 5 requests that grow to ~20 tokens each: preemption and recompute.
    engine = PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", kv_cache_blocks=12, block_size=4)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), preempt(seq))
    outputs = engine.generate(prompts, params)
    assert preempted
    for i, (out, exp) in enumerate(zip(outputs, expected, strict=True)):
        assert out.token_ids == exp.token_ids, i
    assert len(set(outputs[0].token_ids)) > 3  # the sampled rows do sample


def test_options_on_the_triton_backend() -> None:
    """The kernels' engine runs the same processors (the interpreter on a CPU: a small batch of one), here on a
    prompt run in chunks of 3 tokens over its cached prefix."""
    hf, config, state_dict = random_hf_model(31, hidden=160, heads=2, layers=2, vocab=101)
    state_dict = {name: tensor.to(DEVICE) for name, tensor in state_dict.items()}
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, ops="triton", kv_cache_blocks=16,
                         block_size=4, max_num_batched_tokens=3)
    options = {"no_repeat_ngram_size": 1, "bad_words_ids": [[3, 1, 4], [90]], "eos_token_id": [5, 100]}
    out = engine.generate([[3, 1, 4, 1, 5, 9, 2]], [SamplingParams(max_new_tokens=5, **options)])[0]
    expected = hf_generate(hf, [3, 1, 4, 1, 5, 9, 2], 5, **options)
    assert out.token_ids == expected and expected != hf_generate(hf, [3, 1, 4, 1, 5, 9, 2], 5)


@pytest.mark.parametrize(("options", "message"), [
    ({"no_repeat_ngram_size": -1}, r"no_repeat_ngram_size must be an integer in \[0, 8\]"),
    ({"bad_words_ids": [[1, 2], []]}, "bad_words_ids must be a list of non-empty lists of token ids"),
    ({"bad_words_ids": [[1, 2000]]}, r"prompt 0: bad_words_ids holds token id 2000 outside the vocabulary \[0, 53\)"),
    ({"eos_token_id": [3, 53]}, r"prompt 0: eos_token_id holds token id 53 outside the vocabulary \[0, 53\)"),
    ({"eos_token_id": "3"}, "eos_token_id must be a token id or a non-empty list of token ids"),
    ({"min_new_tokens": -2}, "min_new_tokens must be an integer >= 0"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"typical_p": 0.0}, r"typical_p must be in \(0, 1\]"),
    ({"bad_words_ids": [list(range(17))]}, "bad_words_ids holds a word of 17 tokens; at most 16"),
])
def test_bad_options_are_named(model, options, message) -> None:
    _, config, state_dict = model
    engine = Engine(config, state_dict, TOKENIZER, backend="reference", device=torch.device("cpu"), kv_cache_blocks=8)
    with pytest.raises(ValueError, match=message):
        engine.generate([[1, 2, 3]], max_new_tokens=4, **options)
