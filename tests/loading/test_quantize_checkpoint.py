"""`hayabusa quantize`: a compressed-tensors directory that transformers (with compressed-tensors) loads to the very
weights hayabusa loads, the source's other files beside it, and refusals for what cannot be quantized."""

import json

import pytest
import torch

from hayabusa.engine.cli import main
from hayabusa.engine.loading.config import load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint
from hayabusa.engine.loading.tensor_names import EMBED_OUT, layer_linear_weights
from hayabusa.engine.loading.weights import load_weights
from hayabusa.kernels.quantized_weight import QuantizedWeight, dequantize_ref

from quantized_checkpoints import GROUPED, LLMC_DIR, grouped_checkpoint, quantization_config, stored_tensors

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return grouped_checkpoint(tmp_path_factory.mktemp("source"))  # float32: the scales are float32 too


def test_the_command_writes_a_loadable_directory(source, tmp_path, capsys) -> None:
    out = tmp_path / "int4"
    assert main(["quantize", str(source), str(out), "--scheme", "int4", "--quiet"]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"wrote {out}: W4A16 (int4, groups of 128, symmetric) on every layer's Linear weights")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())  # tokenizer files too
    assert quantization_config(out)["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    tensors = stored_tensors(out)
    assert tensors[EMBED_OUT].dtype == torch.float32  # the LM head as stored
    assert tensors["gpt_neox_japanese.layers.1.mlp.dense_4h_to_h.weight_packed"].shape == (128, 256 // 8)
    weights = load_weights(out, load_config(out), dtype=torch.float32)
    assert all(isinstance(weights[name], QuantizedWeight) for name in layer_linear_weights(GROUPED))
    assert main(["quantize", str(source), str(out), "--scheme", "int4", "--quiet"]) == 1  # weights there already
    assert "already holds weights (model.safetensors); choose an empty directory" in capsys.readouterr().err
    assert main(["quantize", str(source), str(out), "--scheme", "int8", "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize("name", SCHEMES)
def test_transformers_loads_the_weights_hayabusa_loads(source, tmp_path, name) -> None:
    """The oracle: transformers + compressed-tensors decompressing the directory, in float32 from float32 scales,
    holds exactly hayabusa's dequantized weights."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = quantize_checkpoint(source, tmp_path / name, SCHEMES[name], progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    reference = theirs.state_dict()
    ours = load_weights(out, load_config(out), dtype=torch.float32)
    assert set(ours) == set(reference)
    for weight_name, weight in ours.items():
        dense = dequantize_ref(weight) if isinstance(weight, QuantizedWeight) else weight
        assert torch.equal(dense, reference[weight_name]), weight_name


def test_refusals(source, tmp_path) -> None:
    with pytest.raises(ValueError, match="is quantized already .*quantize an fp checkpoint"):
        quantize_checkpoint(LLMC_DIR, tmp_path / "again", SCHEMES["W8A16"])
    with pytest.raises(ValueError, match=f"the output directory {source} is the source"):
        quantize_checkpoint(source, source, SCHEMES["W8A16"])
    with pytest.raises(ValueError, match="W4A16_ASYM quantizes in groups of 128 columns, but 'gpt_neox_japanese.layers"
                                         ".0.attention.query_key_value.weight' has 160"):
        quantize_checkpoint("tiny", tmp_path / "tiny", SCHEMES["W4A16_ASYM"])
    assert not (tmp_path / "tiny").exists()  # refused before anything was written


def test_the_config_keeps_the_sources_keys(source, tmp_path) -> None:
    out = quantize_checkpoint(source, tmp_path / "q", SCHEMES["W8A16_CHANNEL"], progress=False)
    raw, written = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert {key: value for key, value in written.items() if key != "quantization_config"} == raw
    assert written["quantization_config"]["ignore"] == ["embed_out"]
