"""The paged engine on the Triton kernels (interpreter on CPU), fp32: greedy tokens == reference == transformers.

Tiny model (hidden 160, 2 heads of 80, 2 layers) because the interpreter is slow; each test is a handful of
engine steps. Covers different prompt lengths in one batch, a request joining while others decode, a
prefix-cache hit read back through the paged cache, and preemption with recompute.
"""

import pytest
import torch

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from devices import DEVICE
from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()
MODEL_ARGS = dict(hidden=160, heads=2, layers=2, vocab=101)


pytestmark = pytest.mark.usefixtures("one_torch_thread", "interpreter_memcheck")  # memcheck: every launch in bounds


def reference_tokens(config, state_dict, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=max_new_tokens)] * len(prompts)
    return [out.token_ids for out in reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts, params)]


def hf_tokens(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=hf.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def finished_outputs(updates) -> dict:
    return {update.request_id: update.finished for update in updates if update.finished is not None}


def spy_prefills(engine: PagedEngine) -> list[list[tuple[int, int]]]:
    """Record (tokens, prefix-cache hit) of every sequence with a prompt chunk in every step the engine runs."""
    prefills: list[list[tuple[int, int]]] = []
    launch = engine.runner.launch

    def recording_launch(plan):
        if plan.chunks:
            prefills.append([(len(plan.seqs[row]), plan.seqs[row].num_cached_tokens) for row in plan.chunks])
        return launch(plan)

    engine.runner.launch = recording_launch
    return prefills


def test_batched_prompts_and_a_late_joiner_with_a_cached_prefix() -> None:
    hf, config, state_dict = random_hf_model(31, **MODEL_ARGS)
    state_dict = {name: t.to(DEVICE) for name, t in state_dict.items()}
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, kv_cache_blocks=32, block_size=4,
                         ops="triton")
    prefills = spy_prefills(engine)
    long_prompt = [5, 17, 99, 3, 42, 8, 66, 70, 12]
    prompts = [long_prompt, [77, 1, 2], [9, 30, 31, 32, 60, 61]]
    late = long_prompt[:8] + [23, 24]  # shares two full blocks with the first prompt
    params = SamplingParams(max_new_tokens=3)

    first_ids = [engine.add_request(p, params) for p in prompts]
    finished = finished_outputs(engine.step())  # prefill of the three prompts; publishes their full blocks
    late_id = engine.add_request(late, params)  # joins while the others decode
    while engine.has_unfinished_requests():
        finished.update(finished_outputs(engine.step()))
    assert prefills == [[(9, 0), (3, 0), (6, 0)], [(10, 8)]]  # the late prompt computed only 2 of 10 tokens

    expected = reference_tokens(config, state_dict, prompts + [late], 3)
    actual = [finished[i].token_ids for i in first_ids + [late_id]]
    assert actual == expected
    assert actual == [hf_tokens(hf, p, 3) for p in prompts + [late]]
    assert engine.block_manager.num_free_blocks == 32


def test_preemption_recomputes_to_the_same_tokens() -> None:
    hf, config, state_dict = random_hf_model(32, rotary_pct=0.5, **MODEL_ARGS)
    state_dict = {name: t.to(DEVICE) for name, t in state_dict.items()}
    # 4 blocks of 4 tokens: both prompts fit (2 blocks each), but the first cannot grow to its 9th token
    # without taking the second's blocks.
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, kv_cache_blocks=4, block_size=4,
                         ops="triton")
    prefills = spy_prefills(engine)
    prompts = [[3, 14, 15, 92, 65, 35], [27, 18, 28, 18, 28]]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True)] * 2
    outputs = engine.generate(prompts, params)
    # The second was preempted after 3 tokens and recomputed from 8 tokens, 4 of them a cache hit.
    assert prefills == [[(6, 0), (5, 0)], [(8, 4)]]
    expected = reference_tokens(config, state_dict, prompts, 4)
    assert [out.token_ids for out in outputs] == expected
    assert expected == [hf_tokens(hf, p, 4) for p in prompts]
    assert engine.block_manager.num_free_blocks == 4


def test_engine_api_on_the_triton_backend_matches_the_reference_backend() -> None:
    """Engine(backend="triton") wires generate and stream through the paged engine; same tokens and text."""
    from hayabusa.engine.api import Engine

    _, config, state_dict = random_hf_model(31, **MODEL_ARGS)
    state_dict = {name: tensor.to(DEVICE) for name, tensor in state_dict.items()}
    if "embed_out.weight" in state_dict:
        state_dict["embed_out.weight"] = state_dict["gpt_neox_japanese.embed_in.weight"]  # keep the tie
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5]]
    reference = Engine(config, state_dict, TOKENIZER, backend="reference", device=torch.device(DEVICE))
    triton = Engine(config, state_dict, TOKENIZER, backend="triton", device=torch.device(DEVICE), kv_cache_blocks=8)
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        expected = reference.generate(prompts, params)
        actual = triton.generate(prompts, params)
        assert [o.token_ids for o in actual] == [o.token_ids for o in expected]
        assert "".join(triton.stream(prompts[0], params)) == expected[0].text
    finally:
        triton.close()
