"""Loading quantized weights: an llm-compressor checkpoint (every scheme, the LM head too), its int8 storage formats,
quantization while loading (the same weights as `hayabusa quantize` then a load), and every bad input refused by
name. transformers with compressed-tensors, decompressing the same checkpoint, is the oracle of the numbers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hayabusa.engine.loading.config import ConfigError, load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint
from hayabusa.engine.loading.tensor_names import EMBED_IN, EMBED_OUT, layer_linear_weights
from hayabusa.engine.loading.weights import CheckpointError, load_model_files, load_weights
from hayabusa.kernels.compressed_tensors_format import to_pack_quantized
from hayabusa.kernels.quantized_weight import QuantizedWeight, dequantize_ref, unpack_codes

from quantized_checkpoints import FIXTURE_SCHEMES, LLMC_DIR, SOURCE_DIR, stored_tensors

QKV = "gpt_neox_japanese.layers.0.attention.query_key_value"
MLP_OUT = "gpt_neox_japanese.layers.0.mlp.dense_4h_to_h"


def load(model_dir, dtype=torch.float16, **kwargs):
    return load_weights(model_dir, load_config(model_dir), dtype=dtype, **kwargs)


def equal(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    zeros_equal = (a.zeros is None and b.zeros is None) or (a.zeros is not None and b.zeros is not None
                                                           and torch.equal(a.zeros, b.zeros))
    return (torch.equal(a.qweight, b.qweight) and a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
            and zeros_equal and (a.bits, a.group_size, a.in_features) == (b.bits, b.group_size, b.in_features))


def copy_checkpoint(tmp_path, source=LLMC_DIR):
    target = tmp_path / "checkpoint"
    shutil.copytree(source, target)
    return target


def test_an_llm_compressor_checkpoint_loads_each_linear_in_its_groups_scheme() -> None:
    state_dict = load(LLMC_DIR)
    for module, name in FIXTURE_SCHEMES.items():
        weight, scheme = state_dict[module + ".weight"], SCHEMES[name]
        assert isinstance(weight, QuantizedWeight), module
        assert (weight.bits, weight.group_size, weight.zeros is None) == (scheme.bits, scheme.group_size,
                                                                          scheme.symmetric), module
        assert weight.scales.dtype == torch.float16
    assert state_dict[EMBED_IN].dtype == torch.float16 and state_dict[MLP_OUT + ".weight"].num_groups == 2
    scales32 = load(LLMC_DIR, torch.float32)[QKV + ".weight"].scales  # the scales follow the load dtype, exactly
    assert scales32.dtype == torch.float32 and torch.equal(scales32, state_dict[QKV + ".weight"].scales.float())


def test_the_weights_are_what_compressed_tensors_decompresses() -> None:
    """compressed-tensors' own decompressor (what transformers runs on load), module by module: it computes in the
    stored scales' dtype, so loaded in that dtype (float16 here) every weight is bit for bit its result."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    tensors, ours = stored_tensors(LLMC_DIR), load(LLMC_DIR)
    for module, name in FIXTURE_SCHEMES.items():
        scheme = SCHEMES[name]
        args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy=scheme.strategy,
                                group_size=scheme.group_size)
        stored = {key.removeprefix(module + "."): value for key, value in tensors.items()
                  if key.startswith(module + ".weight")}
        decompressed = PackedQuantizationCompressor.decompress(stored, QuantizationScheme(targets=["Linear"],
                                                                                          weights=args))["weight"]
        assert torch.equal(dequantize_ref(ours[module + ".weight"]), decompressed), module


@pytest.mark.parametrize("storage", ["naive-quantized", "int-quantized"])
def test_int8_storage_formats_load_to_the_same_weights(tmp_path, storage) -> None:
    """The same numbers stored one signed int8 per weight (llm-compressor writes these when asked to)."""
    target = copy_checkpoint(tmp_path)
    packed = load(LLMC_DIR)
    tensors = stored_tensors(LLMC_DIR)
    for module in FIXTURE_SCHEMES:
        weight: QuantizedWeight = packed[module + ".weight"]
        for suffix in ("weight_packed", "weight_shape", "weight_zero_point"):
            tensors.pop(f"{module}.{suffix}", None)
        offset = 1 << (weight.bits - 1)
        tensors[module + ".weight"] = (unpack_codes(weight).to(torch.int16) - offset).to(torch.int8)
        if weight.zeros is not None:
            tensors[module + ".weight_zero_point"] = (weight.zeros.to(torch.int16) - offset).to(torch.int8)
    save_file(tensors, target / "model.safetensors")
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"]["format"] = storage
    for group in raw["quantization_config"]["config_groups"].values():
        group["format"] = storage
    (target / "config.json").write_text(json.dumps(raw))
    loaded = load(target)
    assert all(equal(loaded[module + ".weight"], packed[module + ".weight"]) for module in FIXTURE_SCHEMES)

    tensors[QKV + ".weight"][0, 0] = 8  # outside int4's [-8, 7]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{QKV}.weight' holds values outside \\[-8, 7\\]"):
        load(target)


def test_a_symmetric_zero_point_written_by_older_tools_must_be_zero(tmp_path) -> None:
    target = copy_checkpoint(tmp_path)
    tensors = stored_tensors(LLMC_DIR)
    tensors[QKV + ".weight_zero_point"] = torch.zeros(384 * 4 // 32, 1, dtype=torch.int32)
    save_file(tensors, target / "model.safetensors")
    assert equal(load(target)[QKV + ".weight"], load(LLMC_DIR)[QKV + ".weight"])
    tensors[QKV + ".weight_zero_point"][0, 0] = 1
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match=f"'{QKV}.weight_zero_point' holds nonzero zero points, .* symmetric"):
        load(target)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop(QKV + ".weight_scale"), f"missing tensor '{QKV}.weight_scale'"),
    (lambda t: t.update({QKV + ".weight_packed": torch.zeros(384, 8, dtype=torch.int32)}),
     f"tensor '{QKV}.weight_packed' in model.safetensors has shape \\[384, 8\\], expected \\[384, 16\\]"),
    (lambda t: t.update({QKV + ".weight_packed": torch.zeros(384, 16, dtype=torch.int64)}),
     f"'{QKV}.weight_packed' in model.safetensors has dtype torch.int64, expected torch.int32"),
    (lambda t: t.update({QKV + ".weight_scale": torch.ones(384, 1, dtype=torch.int32)}),
     "weight_scale' in model.safetensors has dtype torch.int32, expected torch.float16 or"),
    (lambda t: t.update({QKV + ".weight_g_idx": torch.zeros(128, dtype=torch.int32)}),
     f"unexpected tensor '{QKV}.weight_g_idx'"),
    (lambda t: t.update({QKV + ".weight": torch.zeros(384, 128, dtype=torch.float16)}),
     f"unexpected tensor '{QKV}.weight'"),
    (lambda t: t.update({QKV + ".weight_shape": torch.tensor([384, 64])}),
     f"tensor '{QKV}.weight_shape' is \\[384, 64\\], expected \\[384, 128\\]"),
])
def test_bad_quantized_tensors_are_refused_by_name(tmp_path, change, message) -> None:
    target = copy_checkpoint(tmp_path)
    tensors = stored_tensors(LLMC_DIR)
    change(tensors)
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load(target)


def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path) -> None:
    target = copy_checkpoint(tmp_path)
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 256  # qkv's K is 128
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"stores '{QKV}' \\(int4 group 256 symmetric\\) in groups of 256 columns, "
                                         f"but '{QKV}.weight' has 128"):
        load(target)


@pytest.mark.parametrize("name", SCHEMES)
def test_quantizing_while_loading_gives_hayabusa_quantizes_weights(tmp_path, name) -> None:
    """--quantization quantizes each layer Linear as stored (float16 here) and converts the scales afterwards: the
    weights `hayabusa quantize` writes, loaded. The embeddings and the LM head stay dense."""
    on_load = load(SOURCE_DIR, torch.float32, quantization=SCHEMES[name])
    written = load(quantize_checkpoint(SOURCE_DIR, tmp_path / name, SCHEMES[name], progress=False), torch.float32)
    config = load_config(SOURCE_DIR)
    for weight_name in layer_linear_weights(config):
        assert equal(on_load[weight_name], written[weight_name]), weight_name
    source = load(SOURCE_DIR, torch.float32)
    for weight_name in (EMBED_IN, EMBED_OUT, "gpt_neox_japanese.final_layer_norm.weight"):
        assert torch.equal(on_load[weight_name], source[weight_name])
    packed = to_pack_quantized(on_load[MLP_OUT + ".weight"])
    assert packed["weight_scale"].dtype == torch.float32  # (written: the stored float16, converted on load)


def test_quantizing_refuses_a_quantized_checkpoint_and_groups_that_do_not_tile() -> None:
    with pytest.raises(CheckpointError, match="is quantized already \\(W4A16 \\(pack-quantized\\) on 1 linear layer"):
        load(LLMC_DIR, quantization=SCHEMES["W8A16"])
    with pytest.raises(ValueError, match="quantization W4A16 quantizes in groups of 128 columns, but 'gpt_neox_japanese"
                                         ".layers.0.attention.query_key_value.weight' has 160 .*W8A16_CHANNEL"):
        load_model_files("tiny", dtype=torch.float32, quantization=SCHEMES["W4A16"])


def test_a_broken_quantization_config_is_named_with_its_file(tmp_path) -> None:
    target = copy_checkpoint(tmp_path)
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"]["quant_method"] = "awq"
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"{target / 'config.json'}: config key 'quantization_config.quant_method'"):
        load(target)
