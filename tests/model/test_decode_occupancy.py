"""The decode step's occupancy table without a compile: NVIDIA's residency rules for sm_90, the bytes each kernel must
move, the rows of one step at the 2.7B shapes (launch counts, roles, predictions) and the fill rule. The compiled
table, with registers from ptxas, is tests/bench/test_decode_occupancy.py."""

import dataclasses

import pytest
import torch

from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.decode_occupancy import (
    H100,
    H200,
    LAUNCH_COST_S,
    Resources,
    decode_step_table,
    resident_ctas,
)

CONFIG = PRESETS["2.7b"]


@pytest.mark.parametrize("warps,registers,shared,expected", [
    (16, 64, 64, (2, "registers")),  # 2048 registers a warp: 8 warps per sub-partition, 32 per SM
    (16, 65, 64, (1, "registers")),  # 2304 a warp: 7 per sub-partition, 28 per SM: one 16-warp CTA
    (16, 40, 64, (3, "registers")),  # 1280 a warp: 12 per sub-partition
    (4, 56, 2048, (9, "registers")),  # decode attention: 1792 a warp, 9 per sub-partition, 36 warps
    (4, 72, 61440, (3, "shared")),  # 61440 + 1024 reserved: 3 fit in 228 KB
    (16, 32, 0, (4, "registers")),  # 64 warps fill both the registers and the 2048 threads: registers come first
    (8, 24, 0, (8, "warps")),  # 768 a warp: 21 per sub-partition, but only 64 warps per SM
    (1, 16, 0, (32, "CTA slots")),
    (32, 65, 0, (0, "registers")),  # 32 warps of 2304 registers exceed the 64K a CTA may hold
])
def test_resident_ctas_follow_the_sm90_occupancy_rules(warps, registers, shared, expected):
    assert resident_ctas(warps, Resources(registers, 0, shared)) == expected


def test_a_batch_1_step_moves_the_weights_once_and_counts_every_launch():
    table = decode_step_table(CONFIG, batch=1, context_len=128, compile_report=None)
    h, inter, vocab, layers = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.vocab_size, CONFIG.num_hidden_layers
    assert [(row.role, row.calls) for row in table.rows] == [
        ("qkv", layers), ("attention", layers), ("attention out", layers), ("mlp in", layers), ("mlp out", layers),
        ("lm head", 1)]
    assert table.launches == 164  # as tests/model/test_launches.py counts the runner's greedy step
    by_role = {row.role: row.bytes for row in table.rows}
    # weights, x (fp16) and the LayerNorm parameters in, the output out; the partials of tiles shared by programs
    # ([264 programs, 2, 1, 16] fp32) written and read
    partials = 2 * 264 * 2 * 16 * 4
    assert by_role["qkv"] == 2 * (3 * h * h + h + 2 * h + 3 * h) + partials
    assert by_role["mlp out"] == 2 * (h * inter + inter + h + h) + partials  # + the residual read
    # attention: q, k, v in and the output out; keys and values of 127 cached positions and the new one's written
    kv = 2 * 32 * 80 * 2
    assert by_role["attention"] == 2 * (3 * h + h) + 128 * kv + 4 * (1 + 8) + 2 * 1 * 32 * 16 * (128 + 2) * 4
    weights = layers * (3 * h * h + h * h + 2 * h * inter) * 2 + vocab * h * 2
    assert 0 < sum(r.calls * r.bytes for r in table.rows) - weights < 0.02 * weights
    for device in (H100, H200):
        assert table.predicted_step_us(device) == pytest.approx(
            table.floor_us(device) + table.launches * LAUNCH_COST_S * 1e6)
    assert table.floor_us(H100) == pytest.approx(1756, rel=0.01)  # the floors: 1.7 ms on an H100
    assert table.floor_us(H200) == pytest.approx(1225, rel=0.01)  # and 1.2 on an H200


def test_the_fill_rule_wants_two_resident_ctas_and_whole_or_many_waves():
    table = decode_step_table(CONFIG, batch=1, context_len=128, compile_report=lambda _: Resources(64, 0, 64))
    qkv = table.rows[0]
    assert qkv.grid == (264,) and qkv.resident == 2 and qkv.waves == 1.0 and qkv.units_per_cta >= 4
    assert qkv.fills_the_chip()
    one_per_sm = dataclasses.replace(qkv, resident=1)
    partial_wave = dataclasses.replace(qkv, grid=(400,))  # 1.52 waves
    many_waves = dataclasses.replace(qkv, grid=(1200,))  # 4.5 waves of 4 units (4800 units: 256-column steps)
    small_shares = dataclasses.replace(qkv, grid=(1500,))  # 5.7 waves, but 3.2 units each: shares differ by 1 / 3
    assert not one_per_sm.fills_the_chip() and not partial_wave.fills_the_chip()
    assert many_waves.units_per_cta == 4 and many_waves.fills_the_chip()
    assert small_shares.waves > 4 and not small_shares.fills_the_chip()


def test_context_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="context_len must be 1 to 2048, got 0"):
        decode_step_table(CONFIG, batch=1, context_len=0, compile_report=None, dtype=torch.float16)
