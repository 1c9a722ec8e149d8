"""Checkpoint loading: every format, every error path, and embed_out tying exactly as transformers 5 does it."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXJapaneseForCausalLM
from transformers.utils import logging as hf_logging

from hayabusa.engine.loading import weights
from hayabusa.engine.loading.checkpoint_writer import write_random_checkpoint
from hayabusa.engine.loading.config import PRESETS, ModelConfig, load_config
from hayabusa.engine.loading.tensor_names import EMBED_IN, EMBED_OUT, expected_shapes
from hayabusa.engine.loading.weights import CheckpointError, load_model_files, load_weights

from devices import DEVICE

hf_logging.set_verbosity_error()  # transformers warns (by design) about the untied and missing tensors below

MICRO = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    max_position_embeddings=64, bos_token_id=95, eos_token_id=95)
LAYER0_QKV = "gpt_neox_japanese.layers.0.attention.query_key_value.weight"
LAST_DENSE_BIAS = "gpt_neox_japanese.layers.2.attention.dense_bias"


def micro_checkpoint(path: Path, config: ModelConfig = MICRO, **kwargs) -> Path:
    kwargs.setdefault("dtype", torch.float32)
    return write_random_checkpoint(path, config, **kwargs)


def rewrite_safetensors(model_dir: Path, edit) -> dict[str, torch.Tensor]:
    """Load model.safetensors, let `edit(state_dict)` change it in place, save it back."""
    state_dict = load_file(model_dir / "model.safetensors")
    edit(state_dict)
    save_file(state_dict, model_dir / "model.safetensors", metadata={"format": "pt"})
    return state_dict


def set_tie_key(model_dir: Path, tie: bool | None) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)
    if tie is not None:
        raw["tie_word_embeddings"] = tie
    (model_dir / "config.json").write_text(json.dumps(raw))


def load_ours(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_weights(model_dir, load_config(model_dir), dtype=dtype, device=device)


def load_theirs(model_dir: Path, dtype: torch.dtype = torch.float32) -> GPTNeoXJapaneseForCausalLM:
    return GPTNeoXJapaneseForCausalLM.from_pretrained(model_dir, dtype=dtype)


def assert_same_as_transformers(ours: dict[str, torch.Tensor], theirs: GPTNeoXJapaneseForCausalLM) -> None:
    """Same names, values and dtypes; embed_out shared with embed_in in ours exactly when transformers shares it."""
    hf_state = theirs.state_dict()
    assert set(ours) == set(hf_state)
    for name, tensor in ours.items():
        assert tensor.dtype == hf_state[name].dtype, name
        assert torch.equal(tensor.cpu(), hf_state[name]), name
    hf_tied = theirs.embed_out.weight.data_ptr() == theirs.gpt_neox_japanese.embed_in.weight.data_ptr()
    assert (ours[EMBED_OUT] is ours[EMBED_IN]) == hf_tied


# --- formats -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "shard_size"), [("safetensors", None), ("safetensors", 20_000), ("bin", None),
                                                 ("bin", 20_000)])
def test_formats_load_like_transformers(tmp_path, fmt, shard_size):
    model_dir = micro_checkpoint(tmp_path, fmt=fmt, shard_size=shard_size)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    assert (model_dir / index).is_file() == (shard_size is not None)
    ours = load_ours(model_dir)
    assert list(ours) == list(expected_shapes(MICRO))
    assert all(tuple(t.shape) == expected_shapes(MICRO)[name] for name, t in ours.items())
    assert ours[EMBED_OUT] is not ours[EMBED_IN]  # abeja layout: a different embed_out, no tie key -> untied
    assert_same_as_transformers(ours, load_theirs(model_dir))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_conversion(tmp_path, stored, target):
    model_dir = micro_checkpoint(tmp_path, dtype=stored)
    raw = load_file(model_dir / "model.safetensors")
    ours = load_ours(model_dir, dtype=target, device=DEVICE)
    for name, tensor in ours.items():
        assert tensor.dtype == target and tensor.device.type == DEVICE and tensor.is_contiguous()
        assert torch.equal(tensor.cpu(), raw[name].to(target)), name


def test_half_to_half_conversion_in_blocks_keeps_the_bits(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "HALF_CONVERSION_BLOCK", 7)  # blocks that split rows, a short last block
    model_dir = micro_checkpoint(tmp_path, dtype=torch.float16)
    raw = load_file(model_dir / "model.safetensors")
    for name, tensor in load_ours(model_dir, dtype=torch.bfloat16).items():
        assert torch.equal(tensor.view(torch.int16), raw[name].to(torch.bfloat16).view(torch.int16)), name


def test_load_model_files_from_directory(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    resolved, config, state_dict = load_model_files(str(model_dir), dtype=torch.float16)
    assert resolved == model_dir and config == MICRO
    assert state_dict[LAYER0_QKV].dtype == torch.float16


def test_known_buffers_are_dropped(tmp_path):
    model_dir = micro_checkpoint(tmp_path)

    def add_buffers(state_dict):
        for i in range(MICRO.num_hidden_layers):
            prefix = f"gpt_neox_japanese.layers.{i}.attention"
            state_dict[f"{prefix}.rotary_emb.inv_freq"] = torch.rand(MICRO.rotary_dims // 2)
            state_dict[f"{prefix}.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # old causal-mask buffer
            state_dict[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
    rewrite_safetensors(model_dir, add_buffers)
    ours = load_ours(model_dir)
    assert list(ours) == list(expected_shapes(MICRO))
    assert_same_as_transformers(ours, load_theirs(model_dir))


def test_legacy_non_zip_bin_loads(tmp_path):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save(state_dict, model_dir / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ours = load_ours(model_dir)
    assert all(torch.equal(ours[name], state_dict[name]) for name in state_dict)


# --- tying, against transformers ---------------------------------------------------------------------------------

def drop_embed_out(state_dict):
    del state_dict[EMBED_OUT]


def copy_embed_in(state_dict):
    state_dict[EMBED_OUT] = state_dict[EMBED_IN].clone()


def only_embed_out(state_dict):
    state_dict[EMBED_OUT] = state_dict.pop(EMBED_IN)


def keep(state_dict):
    pass


TIE_CASES = {  # name: (tie key in config.json, edit of the stored weights, expected tied)
    "no_embed_out": (None, drop_embed_out, True),
    "identical_embed_out": (None, copy_embed_in, True),
    "different_embed_out_no_key": (None, keep, False),  # the real abeja checkpoint
    "different_embed_out_tie_true": (True, keep, False),
    "identical_embed_out_tie_false": (False, copy_embed_in, False),
    "different_embed_out_tie_false": (False, keep, False),
    "only_embed_out_stored": (None, only_embed_out, True),  # transformers ties the other way round
}


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_tying_matches_transformers(tmp_path, case):
    tie_key, edit, expect_tied = TIE_CASES[case]
    model_dir = micro_checkpoint(tmp_path)
    stored = rewrite_safetensors(model_dir, edit)
    set_tie_key(model_dir, tie_key)
    ours = load_ours(model_dir)
    assert (ours[EMBED_OUT] is ours[EMBED_IN]) == expect_tied
    for name in (EMBED_IN, EMBED_OUT):
        if name in stored:
            assert torch.equal(ours[name], stored[name]), name
    assert_same_as_transformers(ours, load_theirs(model_dir))


def test_tie_compares_after_dtype_conversion(tmp_path):
    """An embed_out that differs from embed_in in fp32 but not once rounded to fp16 is tied in fp16 only."""
    model_dir = micro_checkpoint(tmp_path)

    def nearly_equal(state_dict):
        embed_in = state_dict[EMBED_IN]
        rounded = embed_in.half().float()
        state_dict[EMBED_OUT] = torch.where(rounded == embed_in, rounded, embed_in + (rounded - embed_in) / 4)
    stored = rewrite_safetensors(model_dir, nearly_equal)
    assert not torch.equal(stored[EMBED_OUT], stored[EMBED_IN])
    assert torch.equal(stored[EMBED_OUT].half(), stored[EMBED_IN].half())
    for dtype, expect_tied in ((torch.float32, False), (torch.float16, True)):
        ours = load_ours(model_dir, dtype=dtype)
        assert (ours[EMBED_OUT] is ours[EMBED_IN]) == expect_tied
        assert_same_as_transformers(ours, load_theirs(model_dir, dtype))


def test_untied_config_without_embed_out_is_an_error(tmp_path):
    # transformers would leave embed_out randomly initialised here (a silent wrong answer); hayabusa refuses.
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, drop_embed_out)
    set_tie_key(model_dir, False)
    with pytest.raises(CheckpointError, match=r"missing tensor 'embed_out\.weight'.*tie_word_embeddings is false"):
        load_ours(model_dir)


def test_neither_embedding_stored_is_an_error(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, lambda sd: [sd.pop(EMBED_IN), sd.pop(EMBED_OUT)])
    with pytest.raises(CheckpointError) as error:
        load_ours(model_dir)
    assert f"missing tensor '{EMBED_IN}'" in str(error.value) and f"missing tensor '{EMBED_OUT}'" in str(error.value)


# --- validation errors -------------------------------------------------------------------------------------------

def error_of(model_dir: Path, config: ModelConfig = MICRO) -> str:
    with pytest.raises(CheckpointError) as error:
        load_weights(model_dir, config, dtype=torch.float32)
    return str(error.value)


def test_missing_tensor_names_tensor_and_file(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, lambda sd: sd.pop(LAST_DENSE_BIAS))
    assert f"missing tensor '{LAST_DENSE_BIAS}' (looked in model.safetensors)" in error_of(model_dir)


def test_unexpected_tensor(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, lambda sd: sd.update({"gpt_neox_japanese.layers.0.attention.dense_bias":
                                                         torch.ones(MICRO.hidden_size)}))
    message = error_of(model_dir)
    assert "unexpected tensor 'gpt_neox_japanese.layers.0.attention.dense_bias' in model.safetensors" in message


def test_buffer_of_a_layer_the_config_lacks_is_unexpected(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    name = "gpt_neox_japanese.layers.3.attention.rotary_emb.inv_freq"
    rewrite_safetensors(model_dir, lambda sd: sd.update({name: torch.ones(8)}))
    assert f"unexpected tensor '{name}'" in error_of(model_dir)


def test_wrong_shape_names_both_shapes(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, lambda sd: sd.update({LAYER0_QKV: torch.ones(3 * 32, 31)}))
    assert f"tensor '{LAYER0_QKV}' in model.safetensors has shape [96, 31], expected [96, 32]" in error_of(model_dir)


def test_config_that_does_not_match_the_weights(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    message = error_of(model_dir, MICRO.with_overrides(num_hidden_layers=2, hidden_size=64))
    assert "has shape [96, 32], expected [96, 64]" in message and "problem(s)" in message and "more" in message


@pytest.mark.parametrize("absent, value", [("hidden_size", 2560), ("num_hidden_layers", 32), ("vocab_size", 32000)])
def test_a_config_key_absent_and_defaulted_is_named_when_the_weights_disagree(tmp_path, absent, value):
    """transformers silently takes the 2.7B default for a missing key; the mismatch must say so, not blame the
    weights alone."""
    model_dir = micro_checkpoint(tmp_path)
    raw = json.loads((model_dir / "config.json").read_text())
    del raw[absent]
    (model_dir / "config.json").write_text(json.dumps(raw))
    message = error_of(model_dir, load_config(model_dir))
    assert (f"config.json has no '{absent}', so transformers' default for GPT-NeoX-Japanese 2.7B ({absent} = "
            f"{value}) was used") in message


def test_defaulted_keys_that_do_not_change_shapes_are_not_blamed(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    raw = json.loads((model_dir / "config.json").read_text())
    del raw["max_position_embeddings"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    rewrite_safetensors(model_dir, lambda sd: sd.update({LAYER0_QKV: torch.ones(3 * 32, 31)}))
    assert "config.json has no" not in error_of(model_dir, load_config(model_dir))


def test_non_float_dtype(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    rewrite_safetensors(model_dir, lambda sd: sd.update({LAST_DENSE_BIAS: torch.ones(32, dtype=torch.int64)}))
    message = error_of(model_dir)
    assert f"tensor '{LAST_DENSE_BIAS}' in model.safetensors has dtype torch.int64, expected a float dtype" in message


def test_non_float_dtype_in_bin(tmp_path):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state_dict[LAST_DENSE_BIAS] = torch.ones(32, dtype=torch.int32)
    torch.save(state_dict, model_dir / "pytorch_model.bin")
    assert f"'{LAST_DENSE_BIAS}' in pytorch_model.bin has dtype torch.int32" in error_of(model_dir)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_file(tmp_path, fmt, damage):
    model_dir = micro_checkpoint(tmp_path, fmt=fmt)
    path = model_dir / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) - 1000], "garbage": b"\x00\x01 not a checkpoint" * 50,
                      "empty": b""}[damage])
    assert f"cannot read {path}" in error_of(model_dir)


class SystemCall:
    """Pickles as a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class TouchFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("save", [
    dict(),  # torch.save's zip format, pickle protocol 2: torch's loader names the global it refused
    dict(_use_new_zipfile_serialization=False),  # the legacy format
    dict(pickle_protocol=4),  # STACK_GLOBAL, which torch's loader refuses as an opcode without naming a global
])
def test_a_pickle_that_calls_code_is_refused_and_named(tmp_path, save):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    marker = tmp_path / "pwned"
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "payload": SystemCall(f"touch {marker}")}, model_dir / "pytorch_model.bin", **save)
    message = error_of(model_dir)
    assert "holds code, not only tensors: its pickle calls the Python global posix.system (os.system)" in message
    assert "hayabusa loads tensors only and ran none of it" in message
    assert "truncated" not in message and "weights_only" not in message and "will likely succeed" not in message
    assert not marker.exists()


def test_a_pickle_of_some_other_callable_names_it(tmp_path):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "payload": TouchFile(tmp_path / "pwned")}, model_dir / "pytorch_model.bin")
    assert "holds code, not only tensors: its pickle calls the Python global getattr" in error_of(model_dir)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_tensor_pickle_torch_cannot_read_safely_is_not_called_code(tmp_path):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save(state_dict, model_dir / "pytorch_model.bin", pickle_protocol=4)  # tensors only, an opcode torch refuses
    message = error_of(model_dir)
    assert "not a PyTorch checkpoint of tensors" in message and "code" not in message


def test_bin_with_non_tensor_entries(tmp_path):
    model_dir = micro_checkpoint(tmp_path, fmt="bin")
    state_dict = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "step": 3}, model_dir / "pytorch_model.bin")
    assert "entry 'step' in pytorch_model.bin is a int, expected a tensor" in error_of(model_dir)
    torch.save([state_dict], model_dir / "pytorch_model.bin")
    assert "holds a list, expected a state dict" in error_of(model_dir)


def sharded(tmp_path: Path, fmt: str = "safetensors") -> tuple[Path, Path, dict]:
    model_dir = micro_checkpoint(tmp_path, fmt=fmt, shard_size=20_000)
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    index_path = model_dir / index_name
    return model_dir, index_path, json.loads(index_path.read_text())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_pointing_at_missing_shard(tmp_path, fmt):
    model_dir, index_path, index = sharded(tmp_path, fmt)
    last_shard = index["weight_map"][EMBED_OUT]
    (model_dir / last_shard).unlink()
    message = error_of(model_dir)
    assert f"index {index_path.name} puts tensor" in message and f"in shard {last_shard}, which is missing" in message


def test_index_lists_tensor_the_shard_lacks(tmp_path):
    model_dir, index_path, index = sharded(tmp_path)
    index["weight_map"]["gpt_neox_japanese.layers.9.mlp.dense_h_to_4h.weight"] = index["weight_map"][EMBED_IN]
    index_path.write_text(json.dumps(index))
    message = error_of(model_dir)
    assert "places tensor 'gpt_neox_japanese.layers.9.mlp.dense_h_to_4h.weight' in model-00001-of-" in message


def test_shard_holds_tensor_the_index_lacks(tmp_path):
    model_dir, index_path, index = sharded(tmp_path)
    del index["weight_map"][EMBED_IN]
    index_path.write_text(json.dumps(index))
    assert f"holds tensor '{EMBED_IN}', which the index does not list" in error_of(model_dir)


def test_tensor_stored_in_two_shards(tmp_path):
    model_dir, index_path, index = sharded(tmp_path)
    first, last = index["weight_map"][EMBED_IN], index["weight_map"][EMBED_OUT]
    assert first != last
    shard = load_file(model_dir / last)
    shard[EMBED_IN] = torch.zeros(96, 32)
    save_file(shard, model_dir / last, metadata={"format": "pt"})
    index["weight_map"][EMBED_IN] = last  # the index is consistent with the last shard, not with the first
    index_path.write_text(json.dumps(index))
    assert f"tensor '{EMBED_IN}' is stored twice" in error_of(model_dir)


@pytest.mark.parametrize("content", ["{not json", "{}", '{"weight_map": []}', '{"weight_map": {}}'])
def test_unreadable_index(tmp_path, content):
    model_dir, index_path, _ = sharded(tmp_path)
    index_path.write_text(content)
    assert f"index {index_path} is unreadable" in error_of(model_dir)


def test_no_weights_at_all(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "weights.safetensors")
    message = error_of(model_dir)
    assert "holds no weights: expected one of model.safetensors" in message and "weights.safetensors" in message
    assert "does not exist" in error_of(tmp_path / "nowhere")


def test_bad_load_dtype(tmp_path):
    model_dir = micro_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="load dtype"):
        load_weights(model_dir, MICRO, dtype=torch.int8)


# --- the full 2.7B shape ------------------------------------------------------------------------------------------

def test_full_2_7b_checkpoint_loads_in_hayabusa_and_transformers(tmp_path):
    """Write the real-size checkpoint (fp16, 2GB shards, ~5.4 GB), load it with both and compare tensors."""
    config = PRESETS["2.7b"]
    model_dir = tmp_path / "gpt-neox-japanese-2.7b-random"
    try:
        start = time.perf_counter()
        write_random_checkpoint(model_dir, config, shard_size="2GB", dtype=torch.float16, progress=False)
        written = time.perf_counter() - start
        assert len(list(model_dir.glob("model-0000?-of-00003.safetensors"))) == 3
        ours = load_ours(model_dir, dtype=torch.float16)  # shapes and dtypes of all 388 tensors validated
        assert len(ours) == len(expected_shapes(config)) and ours[EMBED_OUT] is not ours[EMBED_IN]
        theirs = GPTNeoXJapaneseForCausalLM.from_pretrained(model_dir, dtype=torch.float16, low_cpu_mem_usage=True)
        hf_state = theirs.state_dict()
        for name in (EMBED_IN, EMBED_OUT, "gpt_neox_japanese.layers.31.attention.dense_bias",
                     "gpt_neox_japanese.layers.0.attention.query_key_value.weight",
                     "gpt_neox_japanese.layers.17.mlp.dense_4h_to_h.weight",
                     "gpt_neox_japanese.final_layer_norm.weight"):
            assert hf_state[name].dtype == torch.float16 and torch.equal(ours[name], hf_state[name]), name
        assert theirs.embed_out.weight.data_ptr() != theirs.gpt_neox_japanese.embed_in.weight.data_ptr()
        print(f"2.7b checkpoint written in {written:.1f}s")
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)  # pytest keeps old tmp dirs; 5.4 GB each would pile up
