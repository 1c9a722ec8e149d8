"""The correctness chain on quantized weights, second link: the paged engine's greedy tokens on QuantizedWeight
linears equal the reference model's on the same weights dequantized, on both op sets (fp32): every scheme on the
torch op set, and under the Triton interpreter llm-compressor's checkpoint holding all four schemes and a quantized
LM head (the GEMV at decode sizes, the tile GEMM for prompts). Off the CPU the engine holds the loader's
QuantizedWeights themselves (no dense copy of a quantized weight exists); on a CPU, what kernels/cpu_linear.py packs
them into for its kernel."""

import pytest
import torch

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.loading.config import load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.tensor_names import EMBED_OUT, layer_linear_weights
from hayabusa.engine.loading.weights import load_weights
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.kernels.cpu_linear import pack_linear_weight
from hayabusa.kernels.quantized_weight import QuantizedWeight
from hayabusa.tokenizer import Tokenizer

from devices import DEVICE
from quantized_checkpoints import LLMC_DIR, grouped_checkpoint

TOKENIZER = Tokenizer.from_pretrained()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return grouped_checkpoint(tmp_path_factory.mktemp("source"), seed=9)


def greedy(engine: PagedEngine, state_dict, config, prompts, steps) -> tuple[list[list[int]], list[list[int]]]:
    """(the engine's tokens, the reference's on the same weights) for greedy requests of `steps` tokens."""
    params = [SamplingParams(max_new_tokens=steps, ignore_eos=True)] * len(prompts)
    actual = [out.token_ids for out in engine.generate(prompts, params)]
    expected = [out.token_ids for out in reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts,
                                                           params)]
    return actual, expected


@pytest.mark.parametrize("name", SCHEMES)
def test_torch_op_set_greedy_equals_the_reference(source, name) -> None:
    config = load_config(source)
    state_dict = load_weights(source, config, dtype=torch.float32, device=DEVICE, quantization=SCHEMES[name])
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, kv_cache_blocks=16, block_size=4, ops="torch")
    for weight_name in layer_linear_weights(config):  # the loader's weights themselves
        layer, role = int(weight_name.split(".")[2]), weight_name.split(".")[-2]
        held = {"query_key_value": "qkv_weight", "dense": "dense_weight", "dense_h_to_4h": "mlp_in_weight",
                "dense_4h_to_h": "mlp_out_weight"}[role]
        weight = getattr(engine.model.layers[layer], held)
        if torch.device(DEVICE).type == "cpu":
            expected_form = pack_linear_weight(state_dict[weight_name], torch.float32)
            assert type(weight) is type(expected_form) and weight.shape == expected_form.shape
        else:
            assert weight is state_dict[weight_name]
    prompts = [[5, 17, 99, 3, 42, 8, 66, 70, 12], [77, 1, 2], [9, 30, 31, 32, 60]]
    actual, expected = greedy(engine, state_dict, config, prompts, 6)
    assert actual == expected
    fp = load_weights(source, config, dtype=torch.float32)
    fp_tokens = [out.token_ids for out in reference_outputs(ReferenceModel(config, fp), TOKENIZER, prompts,
                                                            [SamplingParams(max_new_tokens=6, ignore_eos=True)] * 3)]
    assert fp_tokens != expected or name.startswith("W8")  # int4 moves some greedy token of these prompts


@pytest.mark.usefixtures("interpreter_memcheck")
def test_triton_op_set_greedy_equals_the_reference_on_every_scheme_and_a_quantized_lm_head() -> None:
    config = load_config(LLMC_DIR)
    state_dict = load_weights(LLMC_DIR, config, dtype=torch.float32, device=DEVICE)
    assert isinstance(state_dict[EMBED_OUT], QuantizedWeight)
    engine = PagedEngine(config, state_dict, TOKENIZER, device=DEVICE, kv_cache_blocks=8, block_size=4, ops="triton")
    prompts = [[5, 17, 29, 3, 12, 8, 26, 20, 11], [27, 1]]  # 11 prompt rows: the tile GEMM; decode: the GEMV
    actual, expected = greedy(engine, state_dict, config, prompts, 5)
    assert actual == expected
