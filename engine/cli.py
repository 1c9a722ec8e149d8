"""The `hayabusa` command: generate, tokenize, init-random, verify, bench, serve, batch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from hayabusa.engine.config import DTYPES


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", required=True,
                        help="model directory, hub id (abeja/gpt-neox-japanese-2.7b) or a random preset "
                             "(tiny, small, 2.7b: random weights, for trying the pipeline)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", type=parse_dtype, default=None,
                        help="float32, float16 or bfloat16 (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--backend", choices=("reference", "triton"), default=None,
                        help="default: triton on cuda, reference on cpu")


def run_generate(args: argparse.Namespace) -> int:
    from hayabusa.engine.api import Engine
    from hayabusa.engine.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    try:
        for delta in engine.stream(args.prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:
        engine.close()
    sys.stdout.write("\n")
    return 0


def _hooks() -> dict[str, tuple[str, Callable[[], tuple[Callable, Callable]]]]:
    """Subcommand -> (help, loader of (add_arguments, run)); modules import lazily to keep start-up fast."""

    def tokenize():
        from hayabusa.tokenizer import cli
        return cli.add_arguments, cli.run

    def init_random():
        from hayabusa.engine import checkpoint_writer
        return checkpoint_writer.add_init_random_arguments, checkpoint_writer.run_init_random

    def verify():
        from hayabusa.engine import verify
        return verify.add_arguments, verify.run

    def bench():
        from hayabusa.bench import cli
        return cli.add_arguments, cli.run

    def serve():
        from hayabusa.engine.server import cli
        return cli.add_arguments, cli.run

    def batch():
        from hayabusa.engine.server import batch
        return batch.add_arguments, batch.run

    return {
        "generate": ("generate text, streamed to stdout", lambda: (add_generate_arguments, run_generate)),
        "tokenize": ("print the token ids and pieces of a text", tokenize),
        "init-random": ("write a random-weight checkpoint with the real tensor names and shapes", init_random),
        "verify": ("compare the kernel path with the reference on the same weights", verify),
        "bench": ("benchmark hayabusa side by side with transformers", bench),
        "serve": ("serve an OpenAI-compatible HTTP API (/v1/completions)", serve),
        "batch": ("generate for every line of a jsonl file, on one engine or Ray Data", batch),
    }


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int] | None]:
    parser = argparse.ArgumentParser(prog="hayabusa", description="Fast GPT-NeoX-Japanese inference.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    run = None
    for name, (help_text, load) in _hooks().items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:  # only the chosen command's module is imported
            add_arguments, run = load()
            add_arguments(sub)
    return parser, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        # No GPU: Triton kernels (verify, --backend triton) can still run, slowly, under Triton's CPU
        # interpreter, which must be chosen before any kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    parser, run = build_parser(argv)
    args = parser.parse_args(argv)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except (ValueError, OSError) as err:  # bad input, missing or unreadable files (FileNotFoundError too)
        print(f"hayabusa {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
