"""A small random model and the paged engine on the torch op set (CPU): the step-loop and fork tests' setting."""

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()
# Every sampling feature at once: the general sampler path, seeded.
SAMPLED = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9,
                         repetition_penalty=1.3, seed=7, ignore_eos=True)


def small_model():
    """(config, state_dict) of a 2-layer random GPT-NeoX-Japanese, vocabulary 101, 64 positions, untied."""
    _, config, state_dict = random_hf_model(43, hidden=64, heads=2, layers=2, vocab=101, max_positions=64,
                                            tied=False)
    return config, state_dict


def make_engine(config, state_dict, **kwargs) -> PagedEngine:
    """A paged engine of 64 blocks of 4 tokens unless kwargs say otherwise."""
    kwargs = {"kv_cache_blocks": 64, "block_size": 4, **kwargs}
    return PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", **kwargs)


def blocks_in_use_per_plan(engine: PagedEngine) -> list[int]:
    """Blocks held after each step is planned (the list grows as the engine runs)."""
    usage = []
    schedule = engine.scheduler.schedule

    def spying_schedule(results_in_flight=False):
        plan = schedule(results_in_flight)
        usage.append(engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
        return plan

    engine.scheduler.schedule = spying_schedule
    return usage
