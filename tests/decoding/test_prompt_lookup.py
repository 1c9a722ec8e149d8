"""Prompt-lookup speculation (prompt_lookup_num_tokens): transformers' drafts, and outputs token for token those of
decoding without it (greedy, and seeded sampling with every processor), through batching with other requests,
chunked prefill, prefix hits and preemption, on both op sets; drafts that are rejected give their blocks back."""

import random

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.decoding.prompt_lookup import draft_tokens
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from devices import DEVICE
from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()
# Prompts that repeat themselves, as text that quotes or continues a passage does.
PROMPTS = [[5, 17, 9, 3, 5, 17, 9, 3, 5, 17], [40, 41, 42, 40, 41], [7, 7, 7, 8], [30, 2, 33, 30, 2, 33, 30],
           [11, 12, 13, 14, 15, 16, 11, 12, 13]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    _, config, state_dict = random_hf_model(21, vocab=53, tied=False)
    return config, state_dict


def make_engine(config, state_dict, **kwargs) -> PagedEngine:
    kwargs = {"kv_cache_blocks": 64, "block_size": 4, **kwargs}
    return PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", **kwargs)


def test_drafts_equal_transformers_prompt_lookup() -> None:
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 25))]
        num_tokens, ngram = rng.randrange(1, 6), rng.randrange(1, 4)
        generator = PromptLookupCandidateGenerator(num_output_tokens=num_tokens, max_matching_ngram_size=ngram,
                                                   max_length=1000)
        candidates, _ = generator.get_candidates(torch.tensor([tokens]))
        assert draft_tokens(tokens, num_tokens, ngram) == candidates[0, len(tokens):].tolist(), (tokens, ngram)


SPECULATED = [
    {},
    {"do_sample": True, "temperature": 0.9, "top_k": 10, "repetition_penalty": 1.2, "seed": 3},
    {"do_sample": True, "seed": 1, "no_repeat_ngram_size": 3, "min_p": 0.1, "bad_words_ids": [[15, 15]],
     "min_new_tokens": 4, "typical_p": 0.9},
]


@pytest.mark.parametrize("options", SPECULATED)
def test_speculation_changes_no_token(model, options) -> None:
    """Requests with and without speculation share the batch; a tight pool preempts, a small budget chunks the
    prompts, and the doubled prompts hit the prefix cache."""
    config, state_dict = model
    prompts = PROMPTS + [PROMPTS[0] * 2, PROMPTS[4] * 2]
    plain = [SamplingParams(max_new_tokens=16 + i, **options) for i in range(len(prompts))]
    speculated = [SamplingParams(max_new_tokens=16 + i, prompt_lookup_num_tokens=1 + i % 5,
                                 max_matching_ngram_size=None if i % 2 else 3, **options) if i % 3 else plain[i]
                  for i in range(len(prompts))]
    expected = make_engine(config, state_dict).generate(prompts, plain)
    engine = make_engine(config, state_dict, kv_cache_blocks=24, max_num_seqs=5, max_num_batched_tokens=9)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), preempt(seq))
    outputs = engine.generate(prompts, speculated)
    for i, (out, exp) in enumerate(zip(outputs, expected, strict=True)):
        assert (out.token_ids, out.text, out.finish_reason) == (exp.token_ids, exp.text, exp.finish_reason), i
    stats = [out.speculation for out in outputs if out.speculation is not None]
    assert len(stats) == 4 and sum(s.draft_tokens for s in stats) > 0
    if not options:  # greedy random models repeat themselves: prompt lookup finds what they are about to say
        assert sum(s.accepted_tokens for s in stats) > 10
    assert preempted and engine.block_manager.num_free_blocks == 24


def test_requests_with_logprobs_keep_them_in_steps_that_check_drafts(model) -> None:
    """A request that asks for logprobs never drafts, but it shares steps with one that does: each of its tokens
    still gets its logprobs (steps with draft checks compute them at the passes' first positions)."""
    config, state_dict = model
    logprobs = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=2)
    speculating = SamplingParams(max_new_tokens=10, ignore_eos=True, prompt_lookup_num_tokens=3)
    (alone,) = make_engine(config, state_dict).generate([PROMPTS[1]], [logprobs])
    together, spec = make_engine(config, state_dict).generate([PROMPTS[1], PROMPTS[0]], [logprobs, speculating])
    assert spec.speculation.draft_checks > 0
    assert together.token_ids == alone.token_ids and len(together.logprobs) == 10
    for got, want in zip(together.logprobs, alone.logprobs, strict=True):
        assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_draft_checks_emit_several_tokens_and_free_rejected_blocks(model) -> None:
    config, state_dict = model
    engine = make_engine(config, state_dict, kv_cache_blocks=40, block_size=2)
    params = SamplingParams(max_new_tokens=24, prompt_lookup_num_tokens=6, ignore_eos=True)
    request = engine.add_request(PROMPTS[0], params)
    updates, held = [], []
    while engine.has_unfinished_requests():
        updates += engine.step()
        for seq in engine.scheduler.running:  # between steps a sequence holds no block past its next write
            held.append(len(seq.block_table) <= engine.block_manager.blocks_needed(len(seq.token_ids)))
    final = updates[-1].finished
    assert all(held) and engine.block_manager.num_free_blocks == 40
    assert sum((u.new_token_ids for u in updates), []) == final.token_ids
    assert "".join(u.text_delta for u in updates) == final.text and updates[-1].request_id == request
    assert max(len(u.new_token_ids) for u in updates) > 1  # a pass emitted several tokens in one update
    spec = final.speculation
    assert spec.draft_checks < len(final.token_ids) and 0 < spec.acceptance_rate <= 1
    assert final.token_ids == make_engine(config, state_dict).generate(
        [PROMPTS[0]], [SamplingParams(max_new_tokens=24, ignore_eos=True)])[0].token_ids


def test_stream_with_speculation(model) -> None:
    config, state_dict = model
    engine = make_engine(config, state_dict)
    params = SamplingParams(max_new_tokens=20, prompt_lookup_num_tokens=3, ignore_eos=True)
    assert "".join(engine.stream(PROMPTS[2], params)) == engine.generate([PROMPTS[2]], [params])[0].text


def test_speculation_on_the_triton_backend() -> None:
    _, config, state_dict = random_hf_model(31, hidden=160, heads=2, layers=2, vocab=101)
    state_dict = {name: tensor.to(DEVICE) for name, tensor in state_dict.items()}
    prompts, params = [PROMPTS[0]], [SamplingParams(max_new_tokens=6, prompt_lookup_num_tokens=3, ignore_eos=True)]
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, ops="triton", kv_cache_blocks=16,
                         block_size=4)
    out = engine.generate(prompts, params)[0]
    reference = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, ops="torch", kv_cache_blocks=16,
                            block_size=4)
    plain = reference.generate(prompts, [SamplingParams(max_new_tokens=6, ignore_eos=True)])[0]
    assert out.token_ids == plain.token_ids
    assert out.speculation.draft_checks > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens must be None or an integer >= 1"),
    ({"prompt_lookup_num_tokens": 2, "max_matching_ngram_size": 0}, "max_matching_ngram_size must be None or"),
    ({"max_matching_ngram_size": 2}, "max_matching_ngram_size needs prompt_lookup_num_tokens"),
])
def test_bad_speculation_options_are_named(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)
