"""`hayabusa quantize` writes what llm-compressor writes: against llm-compressor 0.14's own output for the same fp16
source (tests/fixtures/llmc_rtn, written by tests/fixtures/make_llmc_rtn.py, which also compares the two tools on
whole models), every stored tensor has the same name, dtype and bits, the config groups say the same, and both
checkpoints load to identical weights. llm-compressor pins its own transformers, so it runs apart from the tests."""

import pytest
import torch

from hayabusa.engine.loading.compressed_tensors_config import quantization_config_for
from hayabusa.engine.loading.config import load_config
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint
from hayabusa.engine.loading.weights import load_weights
from hayabusa.kernels.compressed_tensors_format import quantize_rtn, to_pack_quantized
from hayabusa.kernels.quantized_weight import QuantizedWeight

from quantized_checkpoints import (
    FIXTURE_SCHEMES,
    FIXTURE_TARGETS,
    LLMC_DIR,
    SOURCE_DIR,
    quantization_config,
    stored_tensors,
)


@pytest.fixture(scope="module")
def hayabusa_dirs(tmp_path_factory):
    """`hayabusa quantize` of the fixture's source in every scheme."""
    out = tmp_path_factory.mktemp("hayabusa-quantize")
    return {name: quantize_checkpoint(SOURCE_DIR, out / name, scheme, progress=False)
            for name, scheme in SCHEMES.items()}


def module_of(tensor_name: str) -> str | None:
    return next((module for module in FIXTURE_SCHEMES if tensor_name.startswith(module + ".weight")), None)


def test_every_tensor_llm_compressor_wrote_is_the_one_hayabusa_writes(hayabusa_dirs) -> None:
    theirs = stored_tensors(LLMC_DIR)
    ours = {name: stored_tensors(directory) for name, directory in hayabusa_dirs.items()}
    source = stored_tensors(SOURCE_DIR)
    assert len(theirs) == 24
    for tensor_name, tensor in theirs.items():
        module = module_of(tensor_name)
        if module is None:  # kept as stored: embeddings, LayerNorms, the dense bias
            candidates = [source[tensor_name]] + [ours[name][tensor_name] for name in SCHEMES]
        elif module == "embed_out":  # hayabusa quantize keeps the LM head; its quantization is RTN's all the same
            packed = to_pack_quantized(quantize_rtn(source["embed_out.weight"], 8, None, True))
            candidates = [packed[tensor_name.removeprefix("embed_out.")]]
        else:
            candidates = [ours[FIXTURE_SCHEMES[module]][tensor_name]]
        for candidate in candidates:
            assert candidate.dtype == tensor.dtype and torch.equal(candidate, tensor), tensor_name


def test_the_config_groups_say_the_same(hayabusa_dirs) -> None:
    theirs = quantization_config(LLMC_DIR)
    assert [group["targets"] for group in theirs["config_groups"].values()] == list(FIXTURE_TARGETS.values())
    for group, scheme in zip(theirs["config_groups"].values(), FIXTURE_TARGETS, strict=True):
        ours = quantization_config(hayabusa_dirs[scheme])
        assert ours == quantization_config_for(SCHEMES[scheme], ignore=["embed_out"])
        assert group["weights"] == ours["config_groups"]["group_0"]["weights"], scheme
        assert group["format"] == ours["format"] == "pack-quantized"
    # the rest alike, but for the compressed-tensors version llm-compressor stamps (hayabusa writes none)
    assert {key: value for key, value in theirs.items() if key not in ("config_groups", "ignore", "version")} == \
        {key: value for key, value in ours.items() if key not in ("config_groups", "ignore")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_both_checkpoints_load_to_identical_weights(hayabusa_dirs, dtype) -> None:
    theirs = load_weights(LLMC_DIR, load_config(LLMC_DIR), dtype=dtype)
    for module, scheme in FIXTURE_SCHEMES.items():
        if module == "embed_out":
            continue
        ours = load_weights(hayabusa_dirs[scheme], load_config(LLMC_DIR), dtype=dtype)[module + ".weight"]
        mine: QuantizedWeight = theirs[module + ".weight"]
        assert torch.equal(ours.qweight, mine.qweight) and torch.equal(ours.scales, mine.scales), module
        assert (ours.zeros is None) == (mine.zeros is None) and (ours.zeros is None or torch.equal(ours.zeros,
                                                                                                   mine.zeros))
