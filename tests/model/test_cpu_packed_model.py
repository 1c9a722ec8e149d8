"""The torch op set on a CPU packs every linear weight once (kernels/cpu_linear.py) and then owns all its weights,
so an Engine loaded from a directory lets the loaded ones go and reads them again for its reference model; in bf16
the packed engine's logits stay within bf16's tolerance of the reference's, and its greedy tokens follow them."""

import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.loading.quant_schemes import scheme_named
from hayabusa.engine.loading.tensor_names import EMBED_IN
from hayabusa.engine.loading.weights import load_model_files
from hayabusa.engine.model.op_sets import load_ops
from hayabusa.engine.model.paged_model import PagedModel
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.kernels.cpu_linear import PackedLinearWeight

from hf_oracle import random_hf_model
from tolerance import assert_close


def test_bf16_weights_are_packed_and_the_model_owns_the_rest():
    _, config, state_dict = random_hf_model(5, hidden=64, heads=2, layers=2, vocab=96)
    state_dict = {name: tensor.bfloat16() for name, tensor in state_dict.items()}
    model = PagedModel(config, state_dict, load_ops("torch"))
    linears = [model.embed_out] + [w for layer in model.layers for w in (layer.qkv_weight, layer.dense_weight,
                                                                         layer.mlp_in_weight, layer.mlp_out_weight)]
    assert all(isinstance(w, PackedLinearWeight) and w.kind == "onednn" for w in linears)
    assert model.owns_weights
    assert model.embed_in.data_ptr() != state_dict[EMBED_IN].data_ptr()  # a copy: the loaded weights can go
    assert torch.equal(model.embed_in, state_dict[EMBED_IN])


def test_small_fp32_weights_stay_shared():
    _, config, state_dict = random_hf_model(5, hidden=64, heads=2, layers=2, vocab=96)
    model = PagedModel(config, state_dict, load_ops("torch"))
    assert not model.owns_weights  # fp32 under oneDNN's size threshold: linear_ref on the loaded tensors
    assert model.layers[0].qkv_weight is state_dict["gpt_neox_japanese.layers.0.attention.query_key_value.weight"]


def test_a_packed_engine_reloads_its_reference_and_matches_it():
    engine = Engine.from_pretrained("tiny", dtype=torch.bfloat16, device="cpu")
    assert engine.paged.model.owns_weights and engine._reference_weights is None
    ids = [30014, 26883, 26638, 27228, 25]
    expected = torch.log_softmax(engine.logits([ids])[0, -1], dim=-1)  # the reference, on the weights read again
    out = engine.generate([ids], max_new_tokens=1, logprobs=5)[0]
    first = out.logprobs[0]
    # the packed bf16 engine's log-probabilities of its top 5 against the reference's, within bf16's tolerance
    got = torch.tensor([logprob for _, logprob in first.top])
    assert_close(got, expected[[token for token, _ in first.top]], torch.bfloat16)
    assert expected[first.token_id] >= expected.max() - 0.05  # greedy: the reference's top token or a near-tie


def test_an_engine_quantized_while_loading_reloads_its_reference_quantized_the_same_way():
    """Before: the reference was read again without the quantization, so Engine.logits scored the fp weights."""
    engine = Engine.from_pretrained("tiny", dtype=torch.bfloat16, device="cpu", quantization="int8")
    assert engine.paged.model.owns_weights and engine._reference_weights is None
    _, _, quantized = load_model_files("tiny", dtype=torch.bfloat16, device=torch.device("cpu"),
                                       quantization=scheme_named("int8"))
    _, _, dense = load_model_files("tiny", dtype=torch.bfloat16, device=torch.device("cpu"))
    ids = torch.tensor([[30014, 26883, 26638, 27228, 25]])
    logits = engine.logits(ids)
    assert torch.equal(logits, ReferenceModel(engine.config, quantized)(ids))
    assert not torch.equal(logits, ReferenceModel(engine.config, dense)(ids))
