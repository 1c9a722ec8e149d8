"""The reference model against transformers (the oracle) on fresh random tiny configs, fp32."""

import pytest
import torch

from hayabusa.engine.oracle.reference_model import ReferenceModel

from hf_oracle import random_hf_model
from tolerance import assert_close


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(rotary_pct: float, tied: bool) -> None:
    hf, config, state_dict = random_hf_model(seed=int(rotary_pct * 100) + tied, hidden=96, heads=3,
                                             rotary_pct=rotary_pct, tied=tied)
    # Odd head count (3) and head_dim 32; the last layer's dense_bias is random, not zero.
    assert state_dict[f"gpt_neox_japanese.layers.{config.num_hidden_layers - 1}.attention.dense_bias"].abs().min() > 0
    assert (state_dict["embed_out.weight"] is state_dict["gpt_neox_japanese.embed_in.weight"]) == tied
    input_ids = torch.randint(0, config.vocab_size, (2, 23))
    expected = hf(input_ids).logits
    actual = ReferenceModel(config, state_dict)(input_ids)
    assert_close(actual, expected, torch.float32)


def test_incremental_decode_equals_full_forward() -> None:
    _, config, state_dict = random_hf_model(seed=7, hidden=80, heads=1, rotary_pct=0.5)
    model = ReferenceModel(config, state_dict)
    input_ids = torch.randint(0, config.vocab_size, (3, 31))
    full = model(input_ids)
    cache = model.new_cache(batch=3, max_len=31)
    steps = [model(input_ids[:, :11], cache=cache)]
    for t in range(11, 31):  # prompt of 11, then 20 decode steps through the cache
        steps.append(model(input_ids[:, t:t + 1], cache=cache))
    assert_close(torch.cat(steps, dim=1), full, torch.float32)


def test_left_padded_batch_equals_each_sequence_alone() -> None:
    _, config, state_dict = random_hf_model(seed=11)
    model = ReferenceModel(config, state_dict)
    short, long = torch.randint(0, config.vocab_size, (1, 5)), torch.randint(0, config.vocab_size, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :4] = False
    positions = (key_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(batch, positions, key_mask=key_mask)
    assert_close(logits[0, 4:], model(short)[0], torch.float32)
    assert_close(logits[1], model(long)[0], torch.float32)


def test_hidden_states_match_transformers_per_layer() -> None:
    hf, config, state_dict = random_hf_model(seed=3)
    input_ids = torch.randint(0, config.vocab_size, (1, 12))
    expected = hf(input_ids, output_hidden_states=True).hidden_states
    actual = ReferenceModel(config, state_dict).hidden_states(input_ids)
    assert len(actual) == len(expected) == config.num_hidden_layers + 1
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, torch.float32, name=f"hidden state {i}")


def test_position_past_the_table_is_rejected() -> None:
    _, config, state_dict = random_hf_model(seed=5, max_positions=16)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        ReferenceModel(config, state_dict)(torch.zeros(1, 17, dtype=torch.long))
