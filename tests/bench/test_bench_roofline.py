"""The prefill figure's "% of matmul peak": its FLOP count against torch's own count of a transformers prefill, and
a peak measured as the figure needs it (fastest call, the run's dtype and threads)."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hayabusa.bench import roofline, suite
from hayabusa.bench.runners import BenchRunner, GenerateResult
from hayabusa.bench.timing import Timing
from hayabusa.bench.workloads import SIZES
from hayabusa.engine.loading.config import PRESETS


class InstantRunner(BenchRunner):
    name = "hayabusa-reference"

    def __init__(self) -> None:
        super().__init__(Path("."), torch.float32, torch.device("cpu"))

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def generate(self, prompts, gen_lens):
        return GenerateResult(sum(gen_lens), decode_s=None)


@pytest.mark.parametrize(("batch", "prompt_len"), [(1, 24), (2, 37)])
def test_prefill_flops_equal_torchs_count_of_a_transformers_prefill(batch, prompt_len):
    """torch's FlopCounterMode counts every matmul of transformers' forward over the prompt (logits of the last
    token only, as generate computes them). transformers computes all T x T attention scores and masks the upper
    half; a causal prefill needs query t against keys 1..t only, which is what the figure counts."""
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    config = PRESETS["tiny"]
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**config.to_hf_dict())).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, prompt_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, logits_to_keep=1)
    # QK^T and PV, 2 FLOPs per multiply-add, over hidden_size = heads x head_dim, per layer and sequence
    h, layers = config.hidden_size, config.num_hidden_layers
    full_attention = 2 * 2 * layers * batch * h * prompt_len * prompt_len
    causal_attention = 2 * 2 * layers * batch * h * prompt_len * (prompt_len + 1) // 2
    expected = counter.get_total_flops() - full_attention + causal_attention
    assert roofline.prefill_flops(config, batch, prompt_len) == expected


def test_peak_rates_are_the_fastest_timed_call(monkeypatch):
    """Another process can only slow a call: a median of a disturbed measurement put the peak below what the
    engines then reached."""
    monkeypatch.setattr(roofline, "time_ms", lambda *args, **kwargs: Timing([30.0, 10.0, 20.0], 50.0))
    cpu = torch.device("cpu")
    assert roofline.measure_matmul_rate(cpu, torch.float32, size=64) == pytest.approx(2 * 64**3 / 10e-3)
    assert roofline.measure_copy_bandwidth(cpu, num_bytes=1 << 10) == pytest.approx(2 * (1 << 10) / 10e-3)


def test_the_peak_is_measured_in_the_runs_dtype_and_threads_and_divides_the_prefill_flops(monkeypatch):
    seen = []

    def measure(device, dtype, copy_bytes, matmul_size):
        seen.append((dtype, torch.get_num_threads(), matmul_size))
        return roofline.DeviceRoofline(str(device), str(dtype), 1e9, 2e9, copy_bytes, matmul_size)

    monkeypatch.setattr(suite, "measure_roofline", measure)
    monkeypatch.setattr(suite, "make_runner", lambda *args: InstantRunner())
    threads = torch.get_num_threads()
    settings = suite.SuiteSettings(
        model="tiny", model_dir=Path("."), preset="tiny", config=PRESETS["tiny"], device=torch.device("cpu"),
        dtype=torch.bfloat16, sizes=SIZES["smoke"], scenarios=("prefill",), engines=("hayabusa-reference",),
        engines_requested=True, threads=1)
    try:
        result = suite.run_suite(settings)
    finally:
        torch.set_num_threads(threads)
    assert seen == [(torch.bfloat16, 1, SIZES["smoke"].roofline_matmul_size)]
    for record in result.records:
        flops = roofline.prefill_flops(PRESETS["tiny"], 1, record.prompt_len)
        assert record.extra["flops"] == flops
        assert record.pct_roofline == pytest.approx(100 * (flops / 2e9 * 1e3) / record.ms)
