"""`hayabusa verify`: check the kernel path against the plain-PyTorch reference on the same weights.

The reference runs in float32 on the checkpoint's weights as loaded in --dtype (fp16 values upcast exactly),
the kernel path in --dtype. Reported, and checked against the tolerance of --dtype (TOLERANCES):
  - per layer: the hidden state entering each layer and the final LayerNorm output, over every prompt token;
  - logits at every prompt position;
  - error = max |kernel - reference| / max |reference| (relative to the tensor's scale);
  - top-1 agreement at every prompt position; a disagreement passes only at a near-tie, i.e. when the
    reference ranks the kernel's token within `tolerance * max |reference logits|` of its own top token;
  - greedy decoding for --steps tokens through the paged engine (continuous batching, paged KV cache, CUDA
    graphs on a GPU) vs the reference loop: identical tokens, or a first divergence at such a near-tie.
Exit status 0 when every check passes, 1 otherwise.

A quantized model (--quantization, or a quantized checkpoint) is checked the same way, the reference running on its
dequantized weights; then its drift from the fp model (--model itself with --quantization, or --fp-model) is
reported too (engine.oracle.quantization_drift), as figures, not as checks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from hayabusa.engine.api import default_dtype
from hayabusa.engine.core.block_manager import PagedPrompt
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.loading.config import DTYPES, ModelConfig
from hayabusa.engine.loading.quant_schemes import scheme_named
from hayabusa.engine.loading.quantized_tensors import scheme_counts
from hayabusa.engine.loading.tensor_names import LinearWeight
from hayabusa.engine.loading.weights import load_model_files
from hayabusa.engine.oracle.quantization_drift import measure_drift
from hayabusa.engine.oracle.reference_generate import reference_generate
from hayabusa.engine.oracle.reference_model import ReferenceModel, linear
from hayabusa.engine.platform.devices import resolve_device, warn_if_interpreted
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.kernels.quantized_weight import QuantizedWeight
from hayabusa.tokenizer import Tokenizer

T = TypeVar("T")

# Relative error bound per kernel-path dtype for hidden states and logits (reference: float32).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 8e-2}
DEFAULT_PROMPTS = (
    "人とAIが協調するためには、",
    "日本の首都は東京です。京都は",
    "吾輩は猫である。名前はまだ無い。どこで生れたか",
    "今日の天気は晴れのち曇り、",
)
VERIFY_BLOCK_SIZE = 16


@dataclass
class Check:
    name: str
    detail: str
    passed: bool


def relative_error(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    """(max |actual - expected|, that / max |expected|), in float64; NaN or inf in actual counts as infinite."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    diff = (a - e).abs().max().item()
    return diff, diff / max(e.abs().max().item(), 1e-30)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or default_dtype(device)  # "auto": the device's default
    scheme = scheme_named(args.quantization) if args.quantization else None
    model_dir, config, state_dict = load_model_files(args.model, dtype=dtype, device=device, revision=args.revision,
                                                     quantization=scheme)
    quantized = any(isinstance(weight, QuantizedWeight) for weight in state_dict.values())
    if args.fp_model is not None and not quantized:
        raise ValueError(f"--fp-model measures a quantized model's drift, but {args.model} is not quantized (add "
                         "--quantization, or verify a quantized checkpoint)")
    if args.ops == "triton":
        warn_if_interpreted(device, "--ops torch checks the engine without the kernels in seconds")
    tokenizer = Tokenizer.from_pretrained(str(model_dir))
    prompts = [tokenizer.encode(text) for text in (args.prompt or DEFAULT_PROMPTS)]
    for text, ids in zip(args.prompt or DEFAULT_PROMPTS, prompts, strict=True):
        if len(ids) + args.steps > config.max_position_embeddings:  # (the parser refuses an empty --prompt)
            raise ValueError(f"prompt {text!r} has {len(ids)} tokens; with --steps {args.steps} it must fit "
                             f"max_position_embeddings {config.max_position_embeddings}")

    print(f"hayabusa verify: {model_dir}")
    print(f"  {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads; "
          f"{args.ops} ops in {str(dtype).removeprefix('torch.')} on {device} vs the float32 reference; "
          f"prompts: {len(prompts)}, greedy steps: {args.steps}", flush=True)
    if quantized:
        print(f"  quantized weights: {quantized_linears(state_dict)}; the reference runs on them dequantized")
    tolerance = TOLERANCES[dtype]
    reference = ReferenceModel(config, upcast(state_dict))
    engine = PagedEngine(config, state_dict, tokenizer, device=device, ops=args.ops,
                         block_size=VERIFY_BLOCK_SIZE, max_num_seqs=len(prompts),
                         kv_cache_blocks=sum(-(-(len(p) + args.steps) // VERIFY_BLOCK_SIZE) for p in prompts))
    try:
        checks = compare_prefill(config, reference, engine, prompts, tolerance)
        checks += compare_greedy(reference, engine, tokenizer, prompts, args.steps, tolerance)
    finally:
        engine.close()

    for check in checks:
        print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name:<16} {check.detail}")
    failed = [check.name for check in checks if not check.passed]
    if quantized:
        report_drift(args, reference, tokenizer, prompts, device)
    print(f"verify: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} (tolerance {tolerance:g} for "
          f"{str(dtype).removeprefix('torch.')})")
    return 1 if failed else 0


def quantized_linears(state_dict: dict[str, LinearWeight]) -> str:
    """E.g. "W4A16 on 128 linear layers" (a scheme by its name, or described when it is no preset)."""
    return ", ".join(f"{name} on {count} linear layer{'s' * (count > 1)}"
                     for name, count in scheme_counts(state_dict.values()).items())


def report_drift(args: argparse.Namespace, quantized: ReferenceModel, tokenizer: Tokenizer, prompts: list[list[int]],
                 device: torch.device) -> None:
    """The quantized model's drift from the fp one (both float32 references), printed; nothing when no fp model
    is known."""
    fp_source = args.fp_model or (args.model if args.quantization else None)
    if fp_source is None:
        print("  drift from the fp model: not measured (--fp-model DIR names the checkpoint this one was quantized "
              "from)")
        return
    fp_revision = None if args.fp_model else args.revision
    _, fp_config, fp_weights = load_model_files(fp_source, dtype=torch.float32, device=device, revision=fp_revision)
    if fp_config.to_hf_dict() != quantized.config.to_hf_dict():
        raise ValueError(f"--fp-model {fp_source} is another model: its config.json differs from {args.model}'s")
    drift = _with_elapsed_time("drift from the fp model", measure_drift, ReferenceModel(fp_config, fp_weights),
                               quantized, tokenizer, prompts, args.steps)
    print(f"  drift from the fp model {fp_source} (float32 references; figures, not checks):")
    for line in drift.report_lines():
        print(f"       {line}")


def progress(stage: str, iterable: Iterable | None = None, *, total: int | None = None, unit: str = "it") -> tqdm:
    """A progress bar on stderr (the report itself goes to stdout), left in place to show how long each stage took.
    Without a count (neither an iterable nor a total) it shows the time spent so far."""
    counted = iterable is not None or total is not None
    return tqdm(iterable, total=total, desc=f"verify: {stage}", unit=unit, file=sys.stderr, mininterval=1.0,
                bar_format=None if counted else "{desc}: {elapsed}")


def upcast(state_dict: dict[str, LinearWeight]) -> dict[str, LinearWeight]:
    """float32 copies, keeping tied tensors tied; a QuantizedWeight keeps its codes and gets its scales in float32
    (exactly; its dequantized values are then exact, where the kernel path rounds them to its dtype), so no dense
    copy of it is made."""
    copies: dict[int, LinearWeight] = {}
    return {name: copies.setdefault(id(t), _upcast(t)) for name, t in state_dict.items()}


def _upcast(weight: LinearWeight) -> LinearWeight:
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(weight.qweight, weight.scales.float(), weight.zeros, weight.bits, weight.group_size,
                               weight.in_features)
    return weight.float()


@torch.no_grad()
def compare_prefill(config: ModelConfig, reference: ReferenceModel, engine: PagedEngine, prompts: list[list[int]],
                    tolerance: float) -> list[Check]:
    """Per-layer hidden states and all-position logits of each prompt, one prompt at a time, packed into the
    engine's KV pool exactly as its prefill steps are (the blocks are handed back before generation)."""
    fast, runner = engine.model, engine.runner
    num_states = config.num_hidden_layers + 1
    state_errors = [(0.0, 0.0)] * num_states
    logit_errors = (0.0, 0.0)
    agree = positions = 0
    worst_gap = 0.0
    for ids in progress("prefill checks", prompts, unit="prompt"):
        input_ids = torch.tensor([ids], device=fast.device)
        expected_states = [s[0] for s in reference.hidden_states(input_ids)]  # each [T, hidden]
        prompt = PagedPrompt(ids)
        engine.block_manager.allocate(prompt)
        try:
            states = fast.prefill_hidden_states(runner.prepare_prefill([prompt]), runner.kv_caches)
            actual_states = [state[: len(ids)] for state in states]  # rows past the prompt pad a prefill bucket
        finally:
            engine.block_manager.deallocate(prompt)
        for i, (a, e) in enumerate(zip(actual_states, expected_states, strict=True)):
            state_errors[i] = max(state_errors[i], relative_error(a, e), key=lambda x: x[1])
        expected_logits = linear(expected_states[-1], reference.embed_out)  # [T, vocab]
        actual_logits = fast.ops.linear(actual_states[-1], fast.embed_out).float()
        logit_errors = max(logit_errors, relative_error(actual_logits, expected_logits), key=lambda x: x[1])
        chosen = actual_logits.argmax(-1)
        agree += int((chosen == expected_logits.argmax(-1)).sum())
        positions += len(ids)
        gap = expected_logits.max(-1).values - expected_logits.gather(1, chosen[:, None])[:, 0]  # >= 0
        worst_gap = max(worst_gap, gap.max().item() / max(expected_logits.abs().max().item(), 1e-30))

    labels = ["embedding"] + [f"layer {i} out" for i in range(config.num_hidden_layers - 1)] + ["final norm"]
    checks = [Check(label, f"max |err| {err:.3e}  rel {rel:.3e}", rel <= tolerance)
              for label, (err, rel) in zip(labels, state_errors, strict=True)]
    checks.append(Check("logits", f"max |err| {logit_errors[0]:.3e}  rel {logit_errors[1]:.3e}",
                        logit_errors[1] <= tolerance))
    detail = f"{agree}/{positions} positions agree ({100 * agree / positions:.2f}%)"
    if agree < positions:
        detail += f"; the widest reference gap at a disagreement is {worst_gap:.2e} (relative)"
    checks.append(Check("top-1", detail, worst_gap <= tolerance))
    return checks


def compare_greedy(reference: ReferenceModel, engine: PagedEngine, tokenizer: Tokenizer, prompts: list[list[int]],
                   steps: int, tolerance: float) -> list[Check]:
    params = [SamplingParams(max_new_tokens=steps, ignore_eos=True)] * len(prompts)
    expected: list[list[int]] = [[] for _ in prompts]
    events = reference_generate(reference, tokenizer, prompts, params)
    for index, _, finished in progress("greedy, reference", events, total=steps * len(prompts), unit="token"):
        if finished is not None:
            expected[index] = finished.token_ids
    actual = [out.token_ids for out in _with_elapsed_time("greedy, paged engine", engine.generate, prompts, params)]
    checks = []
    for i, (prompt, got, want) in enumerate(zip(prompts, actual, expected, strict=True)):
        same = next((k for k, (a, e) in enumerate(zip(got, want, strict=True)) if a != e), steps)
        if same == steps:
            checks.append(Check(f"greedy {i}", f"{steps}/{steps} tokens identical", True))
            continue
        with torch.no_grad():  # how close the reference found the two tokens at the divergence
            logits = reference(torch.tensor([prompt + want[:same]], device=reference.device),
                               last_token_only=True)[0, 0]
        gap = (logits[want[same]] - logits[got[same]]).item() / logits.abs().max().item()
        checks.append(Check(f"greedy {i}", f"first {same}/{steps} tokens identical, then {got[same]} for "
                                           f"{want[same]} at a reference gap of {gap:.2e} (relative)",
                            gap <= tolerance))
    return checks


def _with_elapsed_time(stage: str, function: Callable[..., T], *args: Any) -> T:
    """function(*args) on a worker thread while the main thread shows the time spent; its exception re-raised here.
    (The paged engine's generate offers no per-step hook to count with.)"""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hayabusa-verify") as pool, progress(stage) as bar:
        future = pool.submit(function, *args)
        while not wait([future], timeout=1.0).done:
            bar.refresh()
        return future.result()
