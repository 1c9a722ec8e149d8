"""`hayabusa bench`: measure hayabusa against transformers and write results.json / results.md / results.png.

    hayabusa bench --model tiny --out bench-out --device cpu          # a few minutes on a 2-core CPU
    hayabusa bench --model 2.7b --out bench/results/h100 --device cuda

Also runnable on its own: `python -m hayabusa.bench.cli ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hayabusa.bench.records import DEFAULT_SCENARIOS, ENGINES, KERNEL_TABLE, SCENARIOS
from hayabusa.engine.loading.model_source import add_model_arguments
from hayabusa.engine.loading.quant_schemes import ALIASES, QUANTIZATION_CHOICES, SCHEMES
from hayabusa.engine.platform.devices import add_device_argument, resolve_device
from hayabusa.engine.platform.dtypes import AUTO, DTYPE_CHOICES, DTYPE_HELP

if TYPE_CHECKING:
    from hayabusa.bench.suite import SuiteSettings

SCENARIO_CHOICES = (*SCENARIOS, KERNEL_TABLE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="directory for results.json, results.md, results.png")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    parser.add_argument("--scenarios", nargs="+", default=None, metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIO_CHOICES)} (space or comma separated; default: all but "
                             "serve, which runs `hayabusa serve` under locust's streaming users and needs "
                             "pip install \"hayabusa[bench,serve]\", and structured, the per-step cost of "
                             "structured outputs' grammar masks at batch 1 and 32); "
                             f"{KERNEL_TABLE}: hayabusa's per-kernel table of one decode step per decode case (GPU)")
    parser.add_argument("--engines", nargs="+", default=None, metavar="ENGINE",
                        help=f"any of {', '.join(ENGINES)} (default: all that can run on the device; naming an "
                             "engine runs it even where it is skipped by default)")
    # workloads.SIZES' names, spelled out: that module imports torch, and --help must not wait for it
    parser.add_argument("--sizes", choices=("auto", "full", "gpu", "cpu", "smoke"), default="auto",
                        help="scenario sizes: full (the GPU figures), gpu (bench/gpu_first_light.sh's: decode at "
                             "batch 1/8/64 and 1920+128, prefill 2048), cpu (scaled down for a CPU), smoke (tests); "
                             "auto picks full on cuda and cpu on cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per figure (median reported; default: the --sizes preset's)")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=None, metavar="N",
                        help="decode these batch sizes (default: the --sizes preset's)")
    parser.add_argument("--decode-tokens", type=int, default=None, metavar="N",
                        help="tokens each decode case generates, the first (prefill's) included (default: the "
                             "--sizes preset's)")
    parser.add_argument("--prefill-prompts", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="prompt lengths of the prefill (time to first token) cases (default: the --sizes "
                             "preset's)")
    parser.add_argument("--long-decode-prompt", type=int, default=None, metavar="TOKENS",
                        help="also decode one sequence after a prompt this long; 0: no such case (default: the "
                             "--sizes preset's, 1920 in gpu)")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                        help="also append every figure, skip, failure and kernel table to FILE as one JSON line "
                             "the moment it exists, so a run cut short keeps what it measured (default: no such file)")
    parser.add_argument("--quantization", nargs="+", default=None, metavar="SCHEME",
                        help="run hayabusa's engines once per SCHEME, quantizing the checkpoint while loading: none "
                             f"(as stored) or any of {', '.join(QUANTIZATION_CHOICES)} (space or comma separated; "
                             "default: none); transformers runs the checkpoint as stored, decompressing a quantized "
                             "one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every engine (default: each engine's own choice; hayabusa picks "
                             "by model size and machine load, transformers keeps torch's default)")


def _choices(values: list[str] | None, allowed: tuple[str, ...], option: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    chosen = [v for value in values for v in value.split(",") if v]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(chosen))


def run(args: argparse.Namespace) -> int:
    settings, plot = _prepare(args)  # a bad option, --out, unknown model or unreadable config: reported by the CLI
    from hayabusa.bench.report import write_results
    from hayabusa.bench.suite import run_suite

    result = run_suite(settings)
    paths = write_results(result.as_dict(), args.out, plot=plot)
    print(f"hayabusa bench: {len(result.records)} figures in {result.seconds:.0f} s -> "
          + ", ".join(str(p) for p in paths.values()) + ("" if plot else " (no results.png: matplotlib is missing)"))
    for skipped in result.skipped:
        scenario = "" if skipped["scenario"] == "all" else f" ({skipped['scenario']})"
        print(f"  skipped {skipped['engine']}{scenario}: {skipped['reason']}")
    for warning in result.warnings:
        print(f"hayabusa bench: warning: {warning}", file=sys.stderr)
    for error in result.errors:
        print(f"  FAILED {error['engine']} {error['scenario']}: {error['error']}", file=sys.stderr)
    return 1 if result.errors else 0


def _prepare(args: argparse.Namespace) -> tuple[SuiteSettings, bool]:
    """(the run's settings, whether results.png can be drawn). Options, --out and the optional packages are checked
    before the model is resolved (a hub id downloads it here): none of them waits for the end of a long run."""
    from hayabusa.bench.preflight import check_optional_packages, prepare_out_dir
    from hayabusa.bench.suite import SuiteSettings
    from hayabusa.bench.workloads import check_sizes_fit, sizes_for
    from hayabusa.engine.api import default_dtype
    from hayabusa.engine.loading.config import DTYPES, ModelConfig
    from hayabusa.engine.loading.model_source import resolve_model_dir
    from hayabusa.engine.loading.random_models import is_random_preset
    from hayabusa.engine.loading.weights import check_quantizable, read_quantization

    device = resolve_device(args.device)
    if device.type == "cpu":
        # Triton kernels (only used when the hayabusa engine is forced on a CPU) need the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = DTYPES.get(args.dtype) or default_dtype(device)  # "auto": the device's default
    scenarios = _choices(args.scenarios, SCENARIO_CHOICES, "--scenarios") or (*DEFAULT_SCENARIOS, KERNEL_TABLE)
    engines = _choices(args.engines, ENGINES, "--engines")
    quantizations = tuple(dict.fromkeys(None if name == "none" else ALIASES.get(name, name) for name in
                                        _choices(args.quantization, ("none", *QUANTIZATION_CHOICES), "--quantization")
                                        or ("none",)))
    sizes = sizes_for(args.sizes, device)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        sizes = replace(sizes, repeats=args.repeats)
    if args.decode_batches is not None:
        if min(args.decode_batches) < 1:
            raise ValueError(f"--decode-batches must all be >= 1, got {' '.join(map(str, args.decode_batches))}")
        if max(args.decode_batches) > sizes.static_batch:
            raise ValueError(f"--decode-batches {max(args.decode_batches)}: more than the {sizes.static_batch} "
                             f"sequences --sizes {sizes.name} gives an engine at once")
        sizes = replace(sizes, decode_batches=tuple(dict.fromkeys(args.decode_batches)))
    if args.decode_tokens is not None:
        if args.decode_tokens < 2:
            raise ValueError(f"--decode-tokens must be >= 2 (a decode step after the first token), got "
                             f"{args.decode_tokens}")
        sizes = replace(sizes, decode_gen_len=args.decode_tokens)
    if args.prefill_prompts is not None:
        if min(args.prefill_prompts) < 1:
            raise ValueError(f"--prefill-prompts must all be >= 1, got {' '.join(map(str, args.prefill_prompts))}")
        sizes = replace(sizes, prefill_prompt_lens=tuple(dict.fromkeys(args.prefill_prompts)))
    if args.long_decode_prompt is not None:
        if args.long_decode_prompt < 0:
            raise ValueError(f"--long-decode-prompt must be >= 0 (0: no long-context case), got "
                             f"{args.long_decode_prompt}")
        sizes = replace(sizes, long_decode_prompt_len=args.long_decode_prompt or None)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # hayabusa's engine then keeps this count, as asked
    prepare_out_dir(args.out)
    if args.jsonl is not None:
        _check_appendable(args.jsonl)
    plot = check_optional_packages(engines or ENGINES, engines is not None, scenarios)
    preset = args.model if is_random_preset(args.model) else None
    model_dir = resolve_model_dir(args.model, args.revision)
    config = ModelConfig.from_json(model_dir / "config.json")
    check_sizes_fit(sizes, config.max_position_embeddings)
    stored = read_quantization(model_dir, config)
    for name in filter(None, quantizations):
        try:
            check_quantizable(model_dir, config, SCHEMES[name], stored)
        except ValueError as err:
            raise ValueError(f"--quantization {name}: {err}") from None
    return SuiteSettings(model=args.model, model_dir=model_dir, preset=preset, config=config, device=device,
                         dtype=dtype, sizes=sizes, scenarios=scenarios, engines=engines or ENGINES,
                         engines_requested=engines is not None, threads=args.threads, jsonl=args.jsonl,
                         quantizations=quantizations), plot


def _check_appendable(path: Path) -> None:
    """--jsonl FILE can be appended to (created with its directory if missing), or ValueError naming it."""
    if path.is_dir():
        raise ValueError(f"--jsonl {path} is a directory; give a file to append JSON lines to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ValueError(f"--jsonl {path}: cannot append to it ({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    """`hayabusa bench ...`: the same command, errors and exit status."""
    from hayabusa.engine.cli import main as hayabusa_main

    return hayabusa_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
