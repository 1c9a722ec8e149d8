"""The sampling math: transformers' processors as the oracle, seeded draws independent of the batch."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hayabusa.engine.oracle.reference_sampler import sample_next_tokens
from hayabusa.engine.sample.ops import apply_penalty, mask_top_k_top_p
from hayabusa.engine.sample.processors_from_lists import seen_mask
from hayabusa.engine.sample.seeds import gumbel_noise
from hayabusa.engine.sampling_params import SamplingParams


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seen = [[1, 2, 2, 7], [49], [0, 10, 20, 30, 40]]
    for penalty in (1.3, 0.7):
        expected = torch.stack([
            RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([s]), logits[b:b + 1].clone())[0]
            for b, s in enumerate(seen)
        ])
        actual = apply_penalty(logits, seen_mask(seen, 50, logits.device), torch.full((3,), penalty))
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (0, 0.3), (7, 0.6), (1, 1.0)])
def test_top_k_top_p_mask_matches_transformers(top_k: int, top_p: float) -> None:
    torch.manual_seed(top_k)
    logits = torch.randn(4, 64) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    actual = mask_top_k_top_p(logits, torch.full((4,), top_k), torch.full((4,), top_p))
    assert torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual[~actual.isinf()], expected[~expected.isinf()])


def test_greedy_is_argmax_and_ignores_seed() -> None:
    logits = torch.randn(5, 40)
    params = [SamplingParams(seed=s) for s in range(5)]
    tokens = sample_next_tokens(logits, params, [[0]] * 5, [1, 2, 3, 4, 5], [0] * 5)
    assert torch.equal(tokens, logits.argmax(-1))
    zero_temperature = [SamplingParams(do_sample=True, temperature=0.0)] * 5
    assert torch.equal(sample_next_tokens(logits, zero_temperature, [[0]] * 5, [9] * 5, [0] * 5), logits.argmax(-1))


def test_seeded_draw_does_not_depend_on_batch_neighbours() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    params = [SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)] * 4
    seeds, steps = [11, 22, 33, 44], [0, 5, 9, 2]
    batched = sample_next_tokens(logits, params, [[1]] * 4, seeds, steps)
    for b in range(4):
        alone = sample_next_tokens(logits[b:b + 1], params[:1], [[1]], seeds[b:b + 1], steps[b:b + 1])
        assert alone.item() == batched[b].item()
    other_step = sample_next_tokens(logits, params, [[1]] * 4, seeds, [s + 1 for s in steps])
    assert not torch.equal(other_step, batched)  # a new step draws new noise


def test_sampled_frequencies_follow_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    expected = logits.softmax(-1)[0]
    draws = 4000
    # One request's first 4000 draws, computed as a batch (draws do not depend on batch neighbours).
    tokens = sample_next_tokens(logits.expand(draws, 5), [SamplingParams(do_sample=True)] * draws, [[0]] * draws,
                                [1234] * draws, list(range(draws)))
    counts = torch.bincount(tokens, minlength=5).float()
    # 4000 draws: the standard error of each frequency is below 0.008.
    assert torch.allclose(counts / draws, expected, atol=0.03), (counts / draws, expected)
    assert counts[4] == 0


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]])
    for step in range(200):
        token = sample_next_tokens(logits, [SamplingParams(do_sample=True, top_k=2)], [[0]], [7], [step]).item()
        assert token in (0, 1)
        token = sample_next_tokens(logits, [SamplingParams(do_sample=True, top_p=0.5)], [[0]], [7], [step]).item()
        assert token in (0, 1)


def test_gumbel_noise_is_a_pure_function_of_seed_step_token() -> None:
    a = gumbel_noise(torch.tensor([5, 6]), torch.tensor([3, 3]), 1000)
    b = gumbel_noise(torch.tensor([5]), torch.tensor([3]), 1000)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert torch.isfinite(a).all()
    # Standard Gumbel: mean ~0.5772, variance pi^2/6 ~1.645.
    assert abs(a.mean().item() - 0.5772) < 0.1 and abs(a.var().item() - 1.645) < 0.2
