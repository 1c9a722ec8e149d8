"""Does every kernel of a decode step fill the chip? One row per kernel of one decode step at a model's shapes: the
bytes it must move, its grid, its registers / spills / shared memory from an sm_90 compile, the CTAs one SM holds at
once (from registers, shared memory, warps and CTA slots, by NVIDIA's occupancy rules for compute capability 9.0), the
waves it runs on the device's SMs, and a predicted time: bytes / the device's measured copy bandwidth + a stated
per-launch cost, so that a GPU run's measured times say which kernels miss and by how much.

The launches are recorded on meta tensors (launches.py: the engine's configs for a simulated H200, whose 132 SMs
and sm_90 limits an H100 SXM shares); the compile report comes from the caller (bench/decode_occupancy.py compiles
every kernel for sm_90 with Triton's own compiler, no GPU needed) and may be absent (then no residency).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.model.launches import BLOCK_SIZE, _record_decode, placeholder_model, placeholder_tickets
from hayabusa.kernels._launch import H200 as H200_LIMITS
from hayabusa.kernels._launch import DeviceLimits, cdiv, engine_tickets, simulated_device
from hayabusa.kernels.launch_count import RecordedLaunch, recorded_launches


@dataclass(frozen=True)
class SmLimits:
    """One SM of compute capability 9.0 (H100 SXM and H200 alike), as CUDA's occupancy calculator counts it."""

    registers: int = 65536
    register_unit: int = 256  # registers are given to a warp in units of 256 (8 per thread)
    sub_partitions: int = 4  # each holds a quarter of the register file and of the warps
    max_registers_per_thread: int = 255
    max_threads: int = 2048
    max_ctas: int = 32
    shared_memory: int = 233472  # 228 KB, of which a CTA may use 227 KB
    reserved_shared_per_cta: int = 1024  # the driver's own, added to every CTA's
    shared_unit: int = 128


SM90 = SmLimits()


@dataclass(frozen=True)
class Device:
    name: str
    num_sms: int
    copy_bytes_per_s: float  # a large device-to-device copy: bytes read plus bytes written per second
    measured: str  # where the bandwidth comes from


# Measured on this workplace's lent machines (the device notes' KINDS.md), not datasheet figures.
H100 = Device("H100 SXM", 132, 3.0e12, "device-to-device copy on nvidia-h100-x1, 2026-11-13")
H200 = Device("H200", 132, 4.3e12, "device-to-device copy on nvidia-h200, 2026-10-28 and 2026-11-04")
DEVICES = (H100, H200)
# Per kernel launch: a CUDA-graph node's launch gap plus the kernel's ramp-up and drain (issue 19 reads 1.5-2.5 us
# per graph node); the prediction's only constant besides the bandwidth.
LAUNCH_COST_S = 2.0e-6
# Launches of the runner's greedy decode step outside the model: the block-table scatter and the sampler's argmax
# (tests/model/test_launches.py counts them on the runner itself).
RUNNER_LAUNCHES = ("aten.index_copy_", "aten.max")
WEIGHT_STREAMING = ("_gemv_kernel", "_gemv_quantized_kernel", "_linear_kernel", "_linear_quantized_kernel")


@dataclass(frozen=True)
class Resources:
    """What an sm_90 compile of a kernel reports."""

    registers: int  # per thread
    spill_bytes: int  # stores + loads
    shared_bytes: int  # per CTA
    grid_dependency: tuple[str, ...] = ()  # griddepcontrol instructions in the PTX: programmatic dependent launch


CompileReport = Callable[[RecordedLaunch], Resources]


def resident_ctas(num_warps: int, resources: Resources, sm: SmLimits = SM90) -> tuple[int, str]:
    """(CTAs of a kernel one SM holds at once, what limits it: "registers", "shared" memory, "warps" or "CTA slots").

    As CUDA's occupancy calculator (cuda_occupancy.h) counts for compute capability 9.0: a warp's registers are
    rounded up to 256 and each of the 4 sub-partitions holds a quarter of the register file (so a CTA fits only
    whole warps into each); a CTA's shared memory is its own plus 1 KB the driver reserves, rounded up to 128 bytes.
    """
    per_warp = -(-resources.registers * 32 // sm.register_unit) * sm.register_unit
    warps_in_registers = (sm.registers // sm.sub_partitions // per_warp) * sm.sub_partitions if per_warp else 1 << 30
    if resources.registers > sm.max_registers_per_thread or per_warp * -(-num_warps // 4) * 4 > sm.registers:
        warps_in_registers = 0
    shared = -(-(resources.shared_bytes + sm.reserved_shared_per_cta) // sm.shared_unit) * sm.shared_unit
    limits = {"registers": warps_in_registers // num_warps, "shared": sm.shared_memory // shared,
              "warps": sm.max_threads // 32 // num_warps, "CTA slots": sm.max_ctas}
    limiter = min(limits, key=limits.__getitem__)
    return limits[limiter], limiter


def _arguments(launch: RecordedLaunch) -> dict:
    return dict(zip(launch.kernel.arg_names, launch.args, strict=False)) | launch.kwargs


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def launch_bytes(launch: RecordedLaunch, context_len: int) -> int:
    """The fewest bytes a launch moves through device memory: each input read once, each output written once (and
    an in-launch reduction's partials written and read once). Decode attention reads the cached keys and values of
    context_len - 1 positions per sequence and writes the new one's."""
    a = _arguments(launch)
    name = launch.name
    if name == "_decode_attention_kernel":
        qkv, out, k_cache = a["qkv_ptr"], a["out_ptr"], a["k_cache_ptr"]
        batch, heads, head_dim = qkv.shape[0], a["NUM_HEADS"], a["HEAD_DIM"]
        kv_token = 2 * heads * head_dim * k_cache.element_size()  # a position's key and value
        splits = a["NUM_SPLITS"]
        partials = 2 * batch * heads * splits * (a["BLOCK_D"] + 2) * 4 if splits > 1 else 0
        return (_nbytes(qkv, out) + batch * context_len * kv_token + batch * 4 * (1 + cdiv(context_len, BLOCK_SIZE))
                + partials)
    if name == "_layer_norm_kernel":
        return 2 * _nbytes(a["x_ptr"]) + _nbytes(a["weight_ptr"], a["bias_ptr"])
    moved = [a["x_ptr"], a["out_ptr"]]
    if name in ("_gemv_kernel", "_linear_kernel"):
        moved.append(a["weight_ptr"])
    elif name in ("_gemv_quantized_kernel", "_linear_quantized_kernel"):
        moved += [a["codes_ptr"], a["scales_ptr"]] + ([a["zeros_ptr"]] if a["HAS_ZEROS"] else [])
    else:
        return _nbytes(*(value for value in a.values() if isinstance(value, torch.Tensor)))
    moved += [a["bias_ptr"]] if a["HAS_BIAS"] else []
    moved += [a["residual_ptr"]] if a["HAS_RESIDUAL"] else []
    moved += [a["ln_weight_ptr"], a["ln_bias_ptr"]] if a.get("HAS_LN") else []
    partial = a["partial_ptr"]
    return _nbytes(*moved) + (2 * _nbytes(partial) if partial is not a["out_ptr"] else 0)


def _role(launch: RecordedLaunch, config: ModelConfig) -> str:
    """What a launch computes in the model: a linear layer by its weight's shape, else the kernel's job."""
    a = _arguments(launch)
    weight = a.get("weight_ptr", a.get("codes_ptr"))
    if launch.name in WEIGHT_STREAMING:
        h, inter, K = config.hidden_size, config.intermediate_size, a["K"]
        roles = {(3 * h, h): "qkv", (h, h): "attention out", (inter, h): "mlp in", (h, inter): "mlp out",
                 (config.vocab_size, h): "lm head"}
        return roles.get((weight.shape[0], K), f"linear {weight.shape[0]}x{K}")
    return {"_decode_attention_kernel": "attention", "_layer_norm_kernel": "layernorm"}.get(launch.name, launch.name)


@dataclass(frozen=True)
class KernelRow:
    role: str
    kernel: str
    calls: int  # per decode step
    bytes: int  # per call
    grid: tuple[int, ...]
    num_warps: int
    resources: Resources | None  # None: no compile report
    resident: int | None  # CTAs per SM
    limiter: str | None
    num_sms: int
    launch: RecordedLaunch

    @property
    def ctas(self) -> int:
        count = 1
        for size in self.grid:
            count *= size
        return count

    @property
    def waves(self) -> float | None:
        """CTAs over the CTAs all SMs hold at once."""
        return None if not self.resident else self.ctas / (self.resident * self.num_sms)

    @property
    def weight_streaming(self) -> bool:
        return self.kernel in WEIGHT_STREAMING

    @property
    def units_per_cta(self) -> float:
        """Work units per CTA: a persistent GEMV's (tile, K-step) units over its programs, 1 for other kernels."""
        if self.kernel not in ("_gemv_kernel", "_gemv_quantized_kernel"):
            return 1.0
        a = _arguments(self.launch)
        block_k = a["BLOCK_K"] if "BLOCK_K" in a else a["SUBSTEPS"] * 32 * a["CHUNK"]
        return cdiv(a["N"], a["BLOCK_N"]) * cdiv(a["K"], block_k) / self.ctas

    def fills_the_chip(self) -> bool:
        """>= 2 CTAs resident per SM (one's start and drain hide behind another's stream), and a whole number of
        waves or >= 4 (a partial last wave costs at most a quarter), where each CTA's work is a whole number of
        equal units or >= 4 of them (the largest share is at most a quarter unit above the mean)."""
        waves, units = self.waves, self.units_per_cta
        return bool(self.resident and self.resident >= 2 and waves is not None
                    and (abs(waves - round(waves)) < 1e-9 and waves >= 1 or waves >= 4)
                    and (units == int(units) or units >= 4))

    def predicted_us(self, device: Device) -> float:
        return (self.bytes / device.copy_bytes_per_s + LAUNCH_COST_S) * 1e6


@dataclass(frozen=True)
class DecodeStepTable:
    batch: int
    context_len: int | None  # positions each sequence attends, the new one included (None: no attention rows)
    dtype: torch.dtype
    rows: list[KernelRow]  # in launch order: one layer's kernels (calls = layers), then the LM head's
    other_launches: tuple[str, ...]  # torch operators of the step (the embedding gather, the runner's ops)
    title: str = "decode step"

    @property
    def launches(self) -> int:
        return sum(row.calls for row in self.rows) + len(self.other_launches)

    def predicted_step_us(self, device: Device) -> float:
        """Every kernel's predicted time, and the launch cost of each torch operator (their bytes are < 0.1%)."""
        return (sum(row.calls * row.predicted_us(device) for row in self.rows)
                + len(self.other_launches) * LAUNCH_COST_S * 1e6)

    def floor_us(self, device: Device) -> float:
        """The bytes alone at the copy bandwidth: no launch costs."""
        return sum(row.calls * row.bytes for row in self.rows) / device.copy_bytes_per_s * 1e6


def decode_step_table(config: ModelConfig, batch: int, context_len: int, compile_report: CompileReport | None,
                      dtype: torch.dtype = torch.float16, limits: DeviceLimits = H200_LIMITS) -> DecodeStepTable:
    """The kernels of one decode step of `batch` sequences with CUDA-graph block tables (full width, as captured),
    each sequence attending context_len positions; resources from compile_report (None: not compiled)."""
    if not 1 <= context_len <= config.max_position_embeddings:
        raise ValueError(f"context_len must be 1 to {config.max_position_embeddings}, got {context_len}")
    blocks_per_seq = cdiv(config.max_position_embeddings, BLOCK_SIZE)
    logs = []
    with simulated_device(limits):
        for num_layers in (1, 2):  # one more layer's launches are one layer's
            model = placeholder_model(config.with_overrides(num_hidden_layers=num_layers), dtype)
            logs.append(_record_decode(model, batch, blocks_per_seq))
    log = logs[0]
    per_layer = len(logs[1].triton) - len(log.triton)
    layer, outside = log.triton[:per_layer], log.triton[per_layer:]  # the LM head (and its LayerNorm) come last
    rows = []
    for launch, calls in [(launch, config.num_hidden_layers) for launch in layer] + [(launch, 1) for launch in outside]:
        resources = compile_report(launch) if compile_report is not None else None
        resident, limiter = resident_ctas(launch.kwargs["num_warps"], resources) if resources else (None, None)
        rows.append(KernelRow(_role(launch, config), launch.name, calls, launch_bytes(launch, context_len),
                              launch.grid, launch.kwargs["num_warps"], resources, resident, limiter, limits.num_sms,
                              launch))
    return DecodeStepTable(batch, context_len, dtype, rows, (*log.torch_ops, *RUNNER_LAUNCHES))


def format_table(table: DecodeStepTable, devices: tuple[Device, ...] = DEVICES) -> str:
    """The table as `python -m hayabusa.bench.decode_occupancy` prints it. pdl: the PTX waits for the previous
    kernel and lets the next one launch (griddepcontrol.wait / .launch_dependents); ok / MISS: a weight-streaming
    kernel meets the fill rule or not (KernelRow.fills_the_chip)."""
    dtype = str(table.dtype).removeprefix("torch.")
    context = "" if table.context_len is None else f", context {table.context_len}"
    lines = [f"{table.title}, batch {table.batch}{context}, {dtype}: {table.launches} launches",
             f"{'kernel':<14}{'calls':>6}{'MB':>8}{'grid':>12}{'warps':>6}{'regs':>5}{'spill':>6}{'smem':>7}"
             f"{'CTA/SM':>7} {'limit':<10}{'waves':>6}{'units':>7}{'pdl':>5}"
             + "".join(f"{d.name + ' us':>13}" for d in devices)]
    for row in table.rows:
        r = row.resources
        pdl = "-" if r is None else "w+l" if len(r.grid_dependency) == 2 else "/".join(r.grid_dependency) or "no"
        cells = (f"{row.role:<14}{row.calls:>6}{row.bytes / 1e6:>8.2f}{'x'.join(map(str, row.grid)):>12}"
                 f"{row.num_warps:>6}" + (f"{r.registers:>5}{r.spill_bytes:>6}{r.shared_bytes:>7}" if r else
                                          f"{'-':>5}{'-':>6}{'-':>7}")
                 + (f"{row.resident:>7} {row.limiter:<10}{row.waves:>6.2f}" if row.resident is not None else
                    f"{'-':>7} {'-':<10}{'-':>6}") + f"{row.units_per_cta:>7.2f}{pdl:>5}")
        mark = "" if not row.weight_streaming or r is None else "  ok" if row.fills_the_chip() else "  MISS"
        lines.append(cells + "".join(f"{row.predicted_us(d):>13.2f}" for d in devices) + mark)
    total_mb = sum(r.calls * r.bytes for r in table.rows) / 1e6
    lines.append(f"{'step' if table.other_launches else 'all':<14}{table.launches:>6}{total_mb:>8.0f}" + " " * 77
                 + "".join(f"{table.predicted_step_us(d):>13.1f}" for d in devices))
    lines.append(f"{'floor (bytes)':<14}" + " " * 91 + "".join(f"{table.floor_us(d):>13.1f}" for d in devices))
    return "\n".join(lines)


# Issue 18's presets (bits, group size, symmetric) on the 2.7B projections; the LM head stays dense (llm-compressor's
# recipes leave embed_out out).
QUANTIZED_SCHEMES = {"int8-channel": (8, None, True), "int8-g128": (8, 128, True), "int4-g128": (4, 128, True),
                     "int4-g128-asym": (4, 128, False)}


def quantized_linear_table(config: ModelConfig, scheme: str, batch: int, compile_report: CompileReport | None,
                           dtype: torch.dtype = torch.float16,
                           limits: DeviceLimits = H200_LIMITS) -> DecodeStepTable:
    """A decode step's linear layers on int8 / int4 weights (QuantizedWeight), as the layers call linear / ln_linear
    at `batch` rows: one row per layer's linear (its LayerNorm launch too above GEMV_MAX_M rows)."""
    from hayabusa.kernels.linear import linear, ln_linear
    from hayabusa.kernels.quantized_weight import QuantizedWeight, code_columns

    bits, group_size, symmetric = QUANTIZED_SCHEMES[scheme]
    h, inter = config.hidden_size, config.intermediate_size
    meta = torch.device("meta")
    rows = []
    # (N, K, LayerNorm fused, bias, activation, residual), as PagedModel's layers call them
    for N, K, has_ln, has_bias, activation, has_residual in ((3 * h, h, True, False, None, False),
                                                             (h, h, False, True, None, True),
                                                             (inter, h, True, False, "gelu", False),
                                                             (h, inter, False, False, None, True)):
        groups = 1 if group_size is None else K // group_size
        weight = QuantizedWeight(torch.empty(N, code_columns(bits, K), dtype=torch.uint8, device=meta),
                                 torch.empty(N, groups, dtype=dtype, device=meta),
                                 None if symmetric else torch.empty(N, groups, dtype=torch.uint8, device=meta),
                                 bits, group_size, K)
        x, vector = torch.empty(batch, K, dtype=dtype, device=meta), torch.empty(K, dtype=dtype, device=meta)
        epilogue = dict(bias=torch.empty(N, dtype=dtype, device=meta) if has_bias else None,
                        residual=torch.empty(batch, N, dtype=dtype, device=meta) if has_residual else None,
                        activation=activation)
        with simulated_device(limits), engine_tickets(placeholder_tickets(config, batch)), \
                recorded_launches() as log:
            if has_ln:
                ln_linear(x, vector, vector, config.layer_norm_eps, weight, **epilogue, checked=False)
            else:
                linear(x, weight, **epilogue, checked=False)
        for launch in log.triton:
            resources = compile_report(launch) if compile_report is not None else None
            resident, limiter = resident_ctas(launch.kwargs["num_warps"], resources) if resources else (None, None)
            rows.append(KernelRow(_role(launch, config), launch.name, config.num_hidden_layers,
                                  launch_bytes(launch, 0), launch.grid, launch.kwargs["num_warps"], resources,
                                  resident, limiter, limits.num_sms, launch))
    return DecodeStepTable(batch, None, dtype, rows, (), title=f"{scheme} linear layers")
