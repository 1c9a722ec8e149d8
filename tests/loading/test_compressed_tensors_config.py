"""config.json's quantization_config: which Linear layers are quantized and how (compressed-tensors' matching), the
config hayabusa writes, and every scheme hayabusa does not run refused with the key and value named."""

import copy
import json

import pytest

from hayabusa.engine.loading.compressed_tensors_config import (
    CheckpointQuantization,
    ModuleQuantization,
    quantization_config_for,
    read_checkpoint_quantization,
)
from hayabusa.engine.loading.config import ConfigError, load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES, WeightScheme, scheme_named
from hayabusa.engine.loading.tensor_names import weight_modules
from hayabusa.engine.loading.weights import read_quantization

from quantized_checkpoints import FIXTURE_SCHEMES, GROUPED, LLMC_DIR, quantization_config

MODULES = weight_modules(GROUPED)
W4A16 = quantization_config_for(SCHEMES["W4A16"], ignore=["embed_out"])


def read(config: dict) -> CheckpointQuantization:
    return read_checkpoint_quantization({"quantization_config": config}, MODULES)


def test_the_names_and_aliases() -> None:
    assert scheme_named("int8") == WeightScheme(8, None, True) == SCHEMES["W8A16_CHANNEL"]
    assert scheme_named("int4") == WeightScheme(4, 128, True) == SCHEMES["W4A16"]
    assert SCHEMES["W4A16_ASYM"].name == "W4A16_ASYM" and WeightScheme(4, 64, True).name == "int4 group 64 symmetric"
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, W8A16, .* got 'int2'"):
        scheme_named("int2")


@pytest.mark.parametrize("name", SCHEMES)
def test_the_written_config_reads_back_as_its_scheme_on_every_layer_linear(name) -> None:
    quantization = read(quantization_config_for(SCHEMES[name], ignore=["embed_out"]))
    linears = [module for module, kind in MODULES.items() if kind == "Linear" and module != "embed_out"]
    assert quantization.modules == {module: ModuleQuantization(SCHEMES[name], "pack-quantized") for module in linears}
    assert quantization.describe() == f"{name} (pack-quantized) on 8 linear layers"


def test_llm_compressors_mixed_groups_match_as_compressed_tensors_matches() -> None:
    """Exact names win over regular expressions, which win over class names; "Linear" also takes the LM head."""
    quantization = read_checkpoint_quantization(json.loads((LLMC_DIR / "config.json").read_text()),
                                                weight_modules(load_config(LLMC_DIR)))
    assert {module: q.scheme for module, q in quantization.modules.items()} == \
        {module: SCHEMES[name] for module, name in FIXTURE_SCHEMES.items()}
    config = copy.deepcopy(W4A16)
    config["config_groups"]["group_1"] = {**config["config_groups"]["group_0"], "targets": [
        "gpt_neox_japanese.layers.1.attention.dense", "re:.*dense$"]}
    config["config_groups"]["group_1"]["weights"] = {**config["config_groups"]["group_0"]["weights"], "num_bits": 8}
    config["config_groups"]["group_2"] = {**config["config_groups"]["group_0"], "targets": ["re:.*layers\\.0\\."]}
    config["ignore"] = ["embed_out", "re:.*layers\\.1\\.mlp"]
    modules = {module: q.scheme.bits for module, q in read(config).modules.items()}
    assert modules == {"gpt_neox_japanese.layers.0.attention.query_key_value": 4,  # group_2's regex before "Linear"
                       "gpt_neox_japanese.layers.0.attention.dense": 8,  # the regexes sort: group_1's comes first
                       "gpt_neox_japanese.layers.0.mlp.dense_h_to_4h": 4,
                       "gpt_neox_japanese.layers.0.mlp.dense_4h_to_h": 4,
                       "gpt_neox_japanese.layers.1.attention.query_key_value": 4,
                       "gpt_neox_japanese.layers.1.attention.dense": 8}  # layer 1's MLP and embed_out ignored


def with_change(path: str, value) -> dict:
    """W4A16's config with the value at a dotted key path set (or removed: value ...)."""
    config = copy.deepcopy(W4A16)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return config


WEIGHTS = "config_groups.group_0.weights"


@pytest.mark.parametrize("path,value,message", [
    ("quant_method", "gptq", "'quantization_config.quant_method' is 'gptq'; hayabusa loads 'compressed-tensors'"),
    ("config_groups.group_0.input_activations", {"num_bits": 8, "type": "int", "strategy": "token"},
     "'quantization_config.config_groups.group_0.input_activations' is .*activation quantization"),
    ("config_groups.group_0.output_activations", {"num_bits": 8}, "output_activations' is"),
    (f"{WEIGHTS}.type", "float", "'quantization_config.config_groups.group_0.weights.type' is 'float'; .*fp8"),
    (f"{WEIGHTS}.num_bits", 2, "weights.num_bits' is 2; hayabusa runs 4- and 8-bit weights"),
    (f"{WEIGHTS}.num_bits", True, "weights.num_bits' is True"),
    (f"{WEIGHTS}.strategy", "tensor", "weights.strategy' is 'tensor'"),
    (f"{WEIGHTS}.strategy", "block", "weights.strategy' is 'block'"),
    (f"{WEIGHTS}.group_size", 100, "weights.group_size' is 100; .*power of two >= 32"),
    (f"{WEIGHTS}.group_size", 16, "weights.group_size' is 16"),
    (f"{WEIGHTS}.symmetric", ..., "weights.symmetric' is None"),
    (f"{WEIGHTS}.dynamic", True, "weights.dynamic' is True"),
    (f"{WEIGHTS}.actorder", "group", "weights.actorder' is 'group'; .*g_idx"),
    (f"{WEIGHTS}.block_structure", [128, 128], "weights.block_structure' is \\[128, 128\\]"),
    ("config_groups.group_0.weights", None, "weights' must be an object, got None"),
    ("config_groups.group_0.format", "float-quantized", "group_0.format' is 'float-quantized'"),
    ("format", "dense", "'quantization_config.format' is 'dense'"),
    ("format", "nvfp4-pack-quantized", "'quantization_config.format' is 'nvfp4-pack-quantized'"),
    ("quantization_status", "frozen", "'quantization_config.quantization_status' is 'frozen'.*save_compressed"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "kv_cache_scheme' is .*KV-cache quantization"),
    ("sparsity_config", {"format": "sparse-24-bitmask"}, "sparsity_config' is .*sparse weights"),
    ("transform_config", {"config_groups": {"u": {}}}, "transform_config' is .*rotations"),
    ("config_groups", {}, "config_groups' must be a non-empty object"),
    ("config_groups.group_0.targets", "Linear", "targets' must be a list of strings, got 'Linear'"),
    ("config_groups.group_0.targets", ["re:("], "holds the target 're:\\(', not a regular expression"),
    ("config_groups.group_0.targets", ["Conv2d"], "quantizes none of the model's Linear layers"),
    ("config_groups.group_0.targets", ["Linear", "Embedding"],
     "group_0' quantizes gpt_neox_japanese.embed_in \\(a Embedding\\); hayabusa quantizes Linear weights only"),
])
def test_what_hayabusa_does_not_run_is_refused_by_key_and_value(path, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        read(with_change(path, value))


def test_accepted_variants() -> None:
    assert read(with_change(f"{WEIGHTS}.actorder", "weight")).modules  # GPTQ's other order stores no permutation
    assert read(with_change("config_groups.group_0.format", None)).modules  # the global format applies
    mixed = read({**with_change("format", "mixed-precision")})
    assert {q.format for q in mixed.modules.values()} == {"pack-quantized"}
    assert read_checkpoint_quantization({}, MODULES) is None


def test_errors_from_a_checkpoint_name_its_config_file(tmp_path) -> None:
    raw = json.loads((LLMC_DIR / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: .*group_0.weights.num_bits' is 3"):
        read_quantization(tmp_path, load_config(tmp_path))
    assert quantization_config(LLMC_DIR)["format"] == "pack-quantized"
