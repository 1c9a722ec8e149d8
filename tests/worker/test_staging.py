"""The packed upload's fields start on 16-byte boundaries whatever the step's lengths, so a prefill of any length and
any number of sequences runs the kernel variants Triton already compiled: Triton specializes every pointer argument
on its 16-byte divisibility, and a field placed by the lengths before it (context_lens after S + 1 cu_seqlens)
would otherwise flip variants, and recompile mid-run, as the lengths change."""

import numpy as np
import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from hayabusa.engine.core.block_manager import PagedPrompt
from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.launches import placeholder_model
from hayabusa.engine.worker.model_runner import ModelRunner
from hayabusa.engine.worker.staging import PackedUpload
from hayabusa.engine.worker.varlen import VarlenBatch, varlen_fields
from hayabusa.kernels._launch import H200, simulated_device
from hayabusa.kernels.launch_count import RecordedLaunch, recorded_launches

SM90 = make_backend(GPUTarget("cuda", 90, 32))
TRITON_POINTER_DIVISIBILITY = 16  # bytes
PREFILL_KERNELS = {"_write_kv_kernel", "_prefill_attention_kernel"}


def test_every_field_starts_on_a_16_byte_boundary():
    rng = np.random.default_rng(0)
    upload = PackedUpload(1 << 20, torch.device("cpu"))
    for _ in range(50):
        num_seqs = int(rng.integers(1, 9))
        counts = rng.integers(1, 40, num_seqs)
        batch = VarlenBatch(np.arange(num_seqs), rng.integers(0, 100, num_seqs), counts, {},
                            rng.integers(0, 2, num_seqs))
        fields = varlen_fields(batch, int(counts.sum()) + int(rng.integers(0, 7)), int(rng.integers(1, 9)))
        for name, view in upload.layout(fields).device.items():
            assert view.data_ptr() % TRITON_POINTER_DIVISIBILITY == 0, (name, [(f[0], f[2]) for f in fields])


def specialization(launch: RecordedLaunch) -> tuple:
    """What Triton compiles a variant for (pointer divisibility, integer classes, constexprs), as its launcher
    computes it for an sm_90 device, for a launch recorded under the interpreter."""
    kernel = JITFunction(launch.kernel.fn, **launch.kernel.kwargs)
    binder = create_function_from_signature(kernel.signature, kernel.params, SM90)
    _, specialization, _ = binder(*launch.args, **launch.kwargs)
    return launch.name, tuple(specialization)


def prefill_variants(runner: ModelRunner, prompt_lengths: list[int]) -> set[tuple]:
    prompts = [PagedPrompt([1] * length, list(range(i * 4, i * 4 + -(-length // 16))))
               for i, length in enumerate(prompt_lengths)]
    inputs = runner.prepare_prefill(prompts)
    with simulated_device(H200), runner.on_device(), recorded_launches() as log:
        runner.model.prefill(inputs, runner.kv_caches)
    return {specialization(launch) for launch in log.triton if launch.name in PREFILL_KERNELS}


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_a_prefill_of_any_length_reuses_one_kernel_variant(dtype):
    config = PRESETS["tiny"]
    runner = ModelRunner(placeholder_model(config, dtype, torch.device("cpu")), block_size=16, num_kv_blocks=64,
                         max_num_seqs=8, max_num_batched_tokens=256, use_cuda_graphs=False)
    variants = set()
    for lengths in ([1], [2], [3], [7], [16], [33], [1, 1], [5, 2], [9, 1, 4], [3, 3, 3, 3, 3], [40, 1, 1, 1, 1, 2]):
        variants |= prefill_variants(runner, lengths)
    assert len(variants) == len(PREFILL_KERNELS), sorted(variants)
