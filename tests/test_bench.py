"""The benchmark suite: roofline arithmetic, workloads, and `hayabusa bench` end to end on the tiny preset (CPU)."""


import pytest
import torch

from hayabusa.bench import roofline
from hayabusa.bench.timing import median
from hayabusa.bench.workloads import SIZES, check_sizes_fit, mixed_lengths, random_prompts
from hayabusa.engine.config import PRESETS

BIG = PRESETS["2.7b"]


def test_decode_weight_bytes_of_the_27b_shape_in_fp16():
    weights = roofline.decode_weight_bytes(BIG, batch=1, bytes_per_param=2)
    assert 5.19e9 <= weights <= 5.4e9  # 5.20 GB
    # 32 layers x 12 h^2 matmul weights + the 32000 x 2560 LM head dominate; LayerNorms and biases are the rest.
    matmul_and_head = (32 * 12 * 2560**2 + 32000 * 2560) * 2
    assert 0 < weights - matmul_and_head < 2e6


def test_decode_step_bytes_add_the_kv_cache_read():
    kv_per_position = roofline.kv_bytes_per_position(BIG, 2)
    assert kv_per_position == 2 * 32 * 2560 * 2
    step = roofline.decode_step_bytes(BIG, [128], 2)
    # the new token attends 128 cached positions and itself, and its K/V are written once
    assert step == roofline.decode_weight_bytes(BIG, 1, 2) + kv_per_position * (128 + 1)
    assert 5.2e9 < step < 5.4e9
    batched = roofline.decode_step_bytes(BIG, [128] * 32, 2)
    assert batched - roofline.decode_weight_bytes(BIG, 32, 2) == 32 * kv_per_position * 129


def test_mean_decode_step_bytes_averages_the_growing_context():
    # steps 1..3 of a prompt-100 run attend 100, 101, 102 cached positions: the mean is the middle step
    mean = roofline.mean_decode_step_bytes(BIG, 4, prompt_len=100, gen_len=4, bytes_per_value=2)
    assert mean == roofline.decode_step_bytes(BIG, [101] * 4, 2)
    with pytest.raises(ValueError, match="gen_len"):
        roofline.mean_decode_step_bytes(BIG, 1, 100, 1, 2)


def test_decode_weight_bytes_equal_the_tied_model_parameter_count():
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    tiny = PRESETS["tiny"]
    with torch.device("meta"):  # shapes only
        model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**tiny.to_hf_dict()))
    unique = {id(p): p.numel() for p in model.parameters()}
    # batch 0: the embedding rows a step looks up are not part of the stored parameters
    assert roofline.decode_weight_bytes(tiny, batch=0, bytes_per_param=1) == sum(unique.values())


def test_prefill_flops_by_hand():
    tiny = PRESETS["tiny"]  # hidden 160, 2 layers, vocab 32000
    h, t = 160, 10
    projections = 2 * t * 2 * (12 * h * h)
    attention = 2 * 2 * 2 * h * (t * (t + 1) // 2)
    lm_head = 2 * h * 32000
    assert roofline.prefill_flops(tiny, batch=1, prompt_len=t) == projections + attention + lm_head
    assert roofline.prefill_flops(tiny, batch=3, prompt_len=t) == 3 * (projections + attention) + 3 * lm_head
    # 2.7B at 2048 tokens: ~2 x 2.6e9 params x 2048 tokens, plus attention
    assert 1.0e13 < roofline.prefill_flops(BIG, 1, 2048) < 1.2e13


def test_floors_and_percentages():
    device = roofline.DeviceRoofline("cpu", "float16", copy_bytes_per_s=2e12, matmul_flops_per_s=5e14,
                                     copy_bytes=1, matmul_size=1)
    assert device.decode_floor_ms(5.2e9) == pytest.approx(2.6)
    assert device.prefill_floor_ms(1e12) == pytest.approx(2.0)
    assert roofline.pct_of_floor(2.6, 5.2) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="measured"):
        roofline.pct_of_floor(1.0, 0.0)


def test_measured_roofline_is_positive_and_finite():
    measured = roofline.measure_roofline(torch.device("cpu"), torch.float32, copy_bytes=1 << 20, matmul_size=64)
    assert 1e6 < measured.copy_bytes_per_s < 1e13
    assert 1e6 < measured.matmul_flops_per_s < 1e15
    assert measured.as_dict()["copy_gb_per_s"] == pytest.approx(measured.copy_bytes_per_s / 1e9)


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_workloads_are_seeded_and_engine_independent():
    assert random_prompts([5, 3], seed=7) == random_prompts([5, 3], seed=7)
    assert random_prompts([5], seed=7) != random_prompts([5], seed=8)
    assert all(0 <= t < 31700 for p in random_prompts([50, 50], seed=1) for t in p)
    lengths = mixed_lengths(100, (4, 9), seed=3)
    assert min(lengths) >= 4 and max(lengths) <= 9 and len(set(lengths)) > 1


def test_cpu_sizes_fit_the_tiny_preset_and_full_sizes_fit_27b():
    check_sizes_fit(SIZES["cpu"], PRESETS["tiny"].max_position_embeddings)
    check_sizes_fit(SIZES["smoke"], PRESETS["tiny"].max_position_embeddings)
    check_sizes_fit(SIZES["full"], BIG.max_position_embeddings)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        check_sizes_fit(SIZES["cpu"], 64)
