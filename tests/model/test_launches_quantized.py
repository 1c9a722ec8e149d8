"""linear / ln_linear on a QuantizedWeight launch what they launch on a dense weight: one kernel per linear at decode
sizes (the LayerNorm fused), a LayerNorm launch and the tile GEMM above, and nothing else (the dequantization is
inside the kernel). Recorded on meta tensors with the H200's configs and an engine's ticket counters (outside an
engine a split launch zero-fills its own), outside tests/kernels/ whose guard-band fixture cannot allocate on meta."""

import torch

from hayabusa.kernels._launch import H200, engine_tickets, simulated_device
from hayabusa.kernels.launch_count import recorded_launches
from hayabusa.kernels.linear import choose_quantized_linear, ln_linear
from hayabusa.kernels.quantized_weight import QuantizedWeight

EPS = 1e-5


def test_one_launch_per_linear_at_2_7b_widths():
    meta = torch.device("meta")
    weight = QuantizedWeight(torch.empty(10240, 1280, dtype=torch.uint8, device=meta),
                             torch.empty(10240, 20, dtype=torch.float16, device=meta),
                             torch.empty(10240, 20, dtype=torch.uint8, device=meta), 4, 128, 2560)
    vector = torch.empty(2560, dtype=torch.float16, device=meta)
    for M, ln_launches in ((1, 0), (4, 0), (16, 1), (2048, 1)):
        x = torch.empty(M, 2560, dtype=torch.float16, device=meta)
        tickets = torch.empty(32000, dtype=torch.int32, device=meta)
        with simulated_device(H200), engine_tickets(tickets), recorded_launches() as log:
            ln_linear(x, vector, vector, EPS, weight, activation="gelu")
        assert len(log.triton) == 1 + ln_launches and not log.torch_ops, (M, [r.name for r in log.triton])
        kernel = "_gemv_quantized_kernel" if M <= 4 else "_linear_quantized_kernel"
        assert log.triton[-1].name == kernel
        with simulated_device(H200):
            choice = choose_quantized_linear(M, weight, torch.float16, meta)
        if choice.gemm is not None:
            assert choice.gemm.block_k <= 128  # a K-tile never straddles a scale group
