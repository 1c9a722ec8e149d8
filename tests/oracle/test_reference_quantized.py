"""The correctness chain on quantized weights, first link: the reference model on a quantized checkpoint's
dequantized weights against transformers decompressing the same checkpoint with compressed-tensors (fp32, tight),
for every scheme; the reference holds the QuantizedWeights themselves, no dense copies."""

import pytest
import torch

from hayabusa.engine.loading.config import load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint
from hayabusa.engine.loading.weights import load_weights
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.kernels.quantized_weight import QuantizedWeight

from quantized_checkpoints import grouped_checkpoint
from tolerance import assert_close

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return grouped_checkpoint(tmp_path_factory.mktemp("source"), seed=5)  # float32: float32 scales


@pytest.mark.parametrize("name", SCHEMES)
def test_logits_on_dequantized_weights_match_transformers(source, tmp_path, name) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = quantize_checkpoint(source, tmp_path / name, SCHEMES[name], progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    config = load_config(out)
    state_dict = load_weights(out, config, dtype=torch.float32)
    reference = ReferenceModel(config, state_dict)
    assert isinstance(reference.layers[0].qkv_weight, QuantizedWeight)
    input_ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids).logits
    assert_close(reference(input_ids), expected, torch.float32)
    fp = ReferenceModel(config, load_weights(source, config, dtype=torch.float32))(input_ids)
    assert (fp - expected).abs().max() > 1e-3  # the quantization shows: the comparison above can fail
