"""The `hayabusa` command (also `python -m hayabusa`): generate, tokenize, init-random, quantize, verify, bench, serve,
batch.

Every command reports a problem the same way, `hayabusa COMMAND: error: ...` on stderr and exit status 1 (2 for a
usage error, with that command's usage), checks --device before anything loads, and exits quietly when its reader
goes away (`hayabusa generate ... | head`).

Building a command's parser imports no torch (nor transformers or triton): each command's flags come from a light module
(this one for generate, tokenize, init-random, quantize and verify), and the module that runs it loads only once the
arguments are parsed, so `hayabusa COMMAND --help` answers at once.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from hayabusa.engine.loading.config import DTYPE_NAMES, PRESETS
from hayabusa.engine.loading.model_source import add_model_arguments
from hayabusa.engine.loading.quant_schemes import QUANTIZATION_CHOICES, add_quantization_argument
from hayabusa.engine.platform.devices import add_device_argument, resolve_device
from hayabusa.engine.platform.dtypes import AUTO, DTYPE_CHOICES, DTYPE_HELP

if TYPE_CHECKING:
    import torch

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a writer killed by SIGPIPE, as `yes | head` leaves it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help, except where there is no default worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unsaid = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS  # (`in` would also match a default of 0, since 0 == False)
        if unsaid or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_dtype(name: str) -> torch.dtype | None:
    """A --dtype name as a torch dtype; None for "auto" (engine.platform.dtypes decides)."""
    from hayabusa.engine.loading.config import DTYPES  # imports torch: only when --dtype is given

    if name == AUTO:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}") from None


def command_line_text(text: str) -> str:
    """The argparse type of a text argument: Python hands over the bytes its encoding (UTF-8 on any current
    system) cannot decode as lone surrogates U+DC80..U+DCFF; refuse them as those bytes."""
    encoding = codecs.lookup(sys.getfilesystemencoding()).name
    label = "UTF-8" if encoding == "utf-8" else encoding
    try:
        os.fsencode(text).decode(encoding)
    except UnicodeError as err:
        raw = err.object if isinstance(err, UnicodeDecodeError) else b""
        where = f": byte 0x{raw[err.start]:02x} at offset {err.start}" if raw else ""
        raise argparse.ArgumentTypeError(f"not valid {label}{where}; pass the text in {label}") from None
    return text


def non_empty_text(text: str) -> str:
    """The argparse type of a prompt, a stop string or a bad word: text as command_line_text, and not empty."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give at least one character")
    return command_line_text(text)


def parse_logit_bias(entry: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS -> (token id, bias); SamplingParams checks the ranges."""
    token_id, separator, bias = entry.partition("=")
    try:
        if separator:
            return int(token_id), float(bias)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"logit bias must be TOKEN_ID=BIAS (e.g. 50256=-100), got {entry!r}")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", type=non_empty_text, help="the prompt text")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                                                                  "holding this much probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide the logits of tokens already seen by this (1: off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per request)")
    parser.add_argument("--stop", type=non_empty_text, action="append", default=[],
                        help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    # transformers' generate options, same names and meaning (README: generate options)
    parser.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-text before this many tokens")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="no n-gram of this size twice (0: off)")
    parser.add_argument("--bad-word", type=non_empty_text, action="append", default=[],
                        help="text never to generate (its tokens as one bad_words_ids entry; repeatable)")
    parser.add_argument("--min-p", type=float, default=0.0, help="sampling: drop tokens below min_p x the likeliest")
    parser.add_argument("--typical-p", type=float, default=1.0, help="sampling: typical decoding mass (1: off)")
    parser.add_argument("--eos-token-id", type=int, action="append", default=None,
                        help="stop at this token id (repeatable; default: the model's)")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=None,
                        help="prompt-lookup speculation: draft this many tokens from the text's own n-grams "
                             "(default: off)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: off)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam scores are divided by generated length ** this")
    parser.add_argument("--early-stopping", choices=("false", "true", "never"), default="false",
                        help="when beam search stops (transformers' early_stopping)")
    parser.add_argument("--num-return-sequences", type=int, default=1,
                        help="completions to print (beams: the best n, best first)")
    # OpenAI's options, same meaning (README: generate options)
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="subtract this from the logit of every token generated so far (-2..2; 0: off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="subtract this x its count from the logit of each token generated so far (-2..2; 0: off)")
    parser.add_argument("--logit-bias", type=parse_logit_bias, action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS (-100..100) to token ID's logit (repeatable)")
    parser.add_argument("--best-of", type=int, default=None,
                        help="sample this many candidates and print the --num-return-sequences best by summed logprob "
                             "(default: as many as --num-return-sequences)")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                            help="the output is JSON valid against the JSON schema in FILE (default: no "
                                 "constraint; at most one of --json-schema, --regex, --choice, --grammar)")
    structured.add_argument("--regex", type=non_empty_text, default=None,
                            help="the output fully matches this regex (default: none)")
    structured.add_argument("--choice", type=non_empty_text, action="append", default=None,
                            help="the output is one of these strings (repeatable; default: none)")
    structured.add_argument("--grammar", type=Path, default=None, metavar="FILE",
                            help="the output derives from the grammar in FILE (GBNF or Lark; default: none)")
    add_device_argument(parser)
    parser.add_argument("--dtype", type=parse_dtype, default=None, metavar="{" + ",".join(DTYPE_CHOICES) + "}",
                        help=DTYPE_HELP)
    parser.add_argument("--backend", choices=("reference", "triton"), default=None,
                        help="default: triton on cuda, reference on cpu")
    add_quantization_argument(parser)


# SamplingParams field -> the generate flag that sets it, where that is not the field's name with dashes
FLAG_OF_FIELD = {"bad_words_ids": "--bad-word"}


def flag_of(field: str) -> str:
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def flag_error(err: ValueError) -> ValueError:
    """A SamplingParams or engine error in the flags the user typed (--max-new-tokens, not max_new_tokens)."""
    from hayabusa.engine.param_names import respelled

    return ValueError(respelled(str(err), flag_of)[0])


def structured_outputs_of(args: argparse.Namespace):  # -> StructuredOutputs | None
    """The constraint --json-schema, --regex, --choice or --grammar asks for; ValueError naming the flag (and file)."""
    from hayabusa.engine.structured_outputs import StructuredOutputs

    flag, kind, value = next(((flag, kind, value) for flag, kind, value in (
        ("--json-schema", "json", args.json_schema), ("--regex", "regex", args.regex),
        ("--choice", "choice", args.choice), ("--grammar", "grammar", args.grammar)) if value is not None),
        (None, None, None))
    if flag is None:
        return None
    if isinstance(value, Path):
        try:
            value = value.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{flag} {value}: cannot read it ({err})") from None
        flag = f"{flag} {args.json_schema or args.grammar}"
    try:
        return StructuredOutputs(**{kind: value})
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def run_generate(args: argparse.Namespace) -> int:
    from hayabusa.engine.api import Engine
    from hayabusa.engine.sampling_params import SamplingParams

    structured = structured_outputs_of(args)  # a bad schema, regex or grammar fails before the model loads

    def params_for(bad_words_ids: tuple[tuple[int, ...], ...]) -> SamplingParams:
        early_stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop), ignore_eos=args.ignore_eos, min_new_tokens=args.min_new_tokens,
            no_repeat_ngram_size=args.no_repeat_ngram_size, bad_words_ids=bad_words_ids, min_p=args.min_p,
            typical_p=args.typical_p, eos_token_id=args.eos_token_id,
            prompt_lookup_num_tokens=args.prompt_lookup_num_tokens, num_beams=args.num_beams,
            length_penalty=args.length_penalty, early_stopping=early_stopping,
            num_return_sequences=args.num_return_sequences, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, logit_bias=dict(args.logit_bias), best_of=args.best_of,
            structured_outputs=structured)

    try:
        params_for(())  # bad options fail here, before the model loads
    except ValueError as err:
        raise flag_error(err) from None
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                                    revision=args.revision, quantization=args.quantization)
    try:
        params = params_for(tuple(tuple(engine.tokenizer.encode(word)) for word in args.bad_word))
        if params.num_beams > 1 or params.num_return_sequences > 1 or params.ranks_candidates:  # one block per output
            for i, out in enumerate(engine.generate(args.prompt, params)):
                score = f" (score {out.score:.4f})" if out.score is not None else \
                    f" (logprob {out.cumulative_logprob:.4f})" if params.ranks_candidates else ""
                sys.stdout.write(f"[{i}]{score}\n{out.text}\n")
                _warn_if_incomplete(out, f"[{i}]")
            return 0
        if structured is not None:  # printed whole, then whether it matched
            out = engine.generate(args.prompt, params)[0]
            sys.stdout.write(out.text + "\n")
            _warn_if_incomplete(out, "the output")
            return 0
        for delta in engine.stream(args.prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except ValueError as err:  # options against the model: --bad-word's tokens, room for --max-new-tokens
        raise flag_error(err) from None
    finally:
        engine.close()
    sys.stdout.write("\n")
    return 0


def _warn_if_incomplete(out, which: str) -> None:  # out: GenerationOutput
    if out.structured_output_complete is False:
        why = "--max-new-tokens ran out" if out.finish_reason == "length" else f"it ended ({out.finish_reason})"
        sys.stderr.write(f"hayabusa generate: warning: {which} does not match the constraint yet: {why} before it "
                         f"was complete\n")


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", type=command_line_text, help="text to tokenize")
    add_model_arguments(parser, required=False,
                        model_help="whose vocab.txt + emoji.json to use: a model directory, a Hub repo id (only those "
                                   "two files are fetched) or a random preset (tiny, small, 2.7b: the vendored "
                                   "vocabulary); default: the vendored GPT-NeoX-Japanese vocabulary")
    parser.add_argument("--clean", action="store_true",
                        help="replace URLs, e-mail addresses, phone numbers, dates and prices by tags first "
                             "(transformers' do_clean_text)")


def run_tokenize(args: argparse.Namespace) -> int:
    """Print the ids and the vocabulary piece of each."""
    from hayabusa.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(args.model, revision=args.revision)
    ids = tokenizer.encode(args.text, clean=args.clean)
    print(f"{len(ids)} tokens")
    print(json.dumps(ids))
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        print(f"{token_id:>6}  {piece}")
    return 0


def add_init_random_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a random-weight GPT-NeoX-Japanese checkpoint (real tensor names, shapes, config "
                          "keys and tokenizer files) that transformers and hayabusa load. Its text is meaningless.")
    parser.add_argument("out_dir", metavar="DIR", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="model shape")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "bin"), default="safetensors",
                        help="weight file format")
    parser.add_argument("--shard-size", type=_shard_size, default=None, metavar="SIZE",
                        help="split the weights into shards of at most SIZE (e.g. 2GB, 500MB) plus an index json; "
                             "default: one file")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float16", help="stored dtype")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same values)")
    ties = parser.add_mutually_exclusive_group()
    ties.add_argument("--tied", action="store_true",
                      help="store no embed_out: the output layer shares embed_in (default: a different embed_out "
                           "and no tie key, like abeja/gpt-neox-japanese-2.7b)")
    ties.add_argument("--untied", action="store_true",
                      help="store a different embed_out and write tie_word_embeddings: false")
    parser.add_argument("--overwrite", action="store_true", help="replace weight files already in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _shard_size(text: str) -> int:
    from hayabusa.engine.loading.checkpoint_writer import (
        parse_size,  # its module imports torch: only when the flag is given
    )

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a weight-only quantized copy of an fp checkpoint in the compressed-tensors format "
                          "(llm-compressor's; vLLM and transformers with compressed-tensors load it), its "
                          "round-to-nearest numbers equal to llm-compressor's for the same scheme. Every layer's "
                          "Linear weights are quantized; the embeddings and the LM head are kept as stored.")
    parser.add_argument("source", metavar="SRC",
                        help="the fp checkpoint: a model directory, a Hub repo id or a random preset")
    parser.add_argument("out_dir", metavar="DST", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--scheme", required=True, choices=QUANTIZATION_CHOICES,
                        help="W8A16, W4A16 (groups of 128, symmetric), W4A16_ASYM (groups of 128 with zero points), "
                             "W8A16_CHANNEL (one scale per output channel); int8 = W8A16_CHANNEL, int4 = W4A16")
    parser.add_argument("--revision", default=None, help="Hub revision of a Hub repo id (default: main)")
    parser.add_argument("--overwrite", action="store_true", help="replace weight files already in DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO,
                        help="kernel-path dtype: " + DTYPE_HELP + "; the reference is float32")
    add_device_argument(parser)
    parser.add_argument("--ops", choices=("triton", "torch"), default="triton",  # model.op_sets.OP_SETS
                        help="triton: the kernels; torch: their plain-PyTorch references")
    parser.add_argument("--prompt", type=non_empty_text, action="append", default=None,
                        help="prompt text (repeatable; default: four built-in Japanese prompts)")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens compared per prompt")
    add_quantization_argument(parser)
    parser.add_argument("--fp-model", default=None, metavar="DIR",
                        help="the fp checkpoint a quantized --model was quantized from, to report how far the "
                             "quantized model drifts from it (default: --model itself with --quantization; none for a "
                             "quantized checkpoint, whose drift then goes unreported)")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: str  # "module:function" adding the command's flags; its module imports no torch
    run: str  # "module:function" running the parsed command; its module loads only then


COMMANDS = {
    "generate": Command("generate text, streamed to stdout",
                        "hayabusa.engine.cli:add_generate_arguments", "hayabusa.engine.cli:run_generate"),
    "tokenize": Command("print the token ids and pieces of a text",
                        "hayabusa.engine.cli:add_tokenize_arguments", "hayabusa.engine.cli:run_tokenize"),
    "init-random": Command("write a random-weight checkpoint with the real tensor names and shapes",
                           "hayabusa.engine.cli:add_init_random_arguments",
                           "hayabusa.engine.loading.checkpoint_writer:run_init_random"),
    "quantize": Command("write an int8 / int4 weight-only quantized copy of a checkpoint (compressed-tensors)",
                        "hayabusa.engine.cli:add_quantize_arguments",
                        "hayabusa.engine.loading.quantize_checkpoint:run"),
    "verify": Command("compare the kernel path with the reference on the same weights",
                      "hayabusa.engine.cli:add_verify_arguments", "hayabusa.engine.oracle.verify:run"),
    "bench": Command("benchmark hayabusa side by side with transformers",
                     "hayabusa.bench.cli:add_arguments", "hayabusa.bench.cli:run"),
    "serve": Command("serve an OpenAI-compatible HTTP API (/v1/completions)",
                     "hayabusa.engine.server.cli:add_arguments", "hayabusa.engine.server.cli:run"),
    "batch": Command("generate for every line of a jsonl file, on one engine or Ray Data",
                     "hayabusa.engine.server.cli:add_batch_arguments", "hayabusa.engine.server.batch:run"),
}


def _function(target: str) -> Callable:
    """The function a "module:function" string names, its module imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _runner(target: str) -> Callable[[argparse.Namespace], int]:
    """The run function a "module:function" string names, its module imported only when it is called."""
    return lambda args: _function(target)(args)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None,
                                           Callable[[argparse.Namespace], int] | None]:
    """(the top-level parser, the chosen command's parser, its run function); only the module adding that command's
    flags loads here, the module running it when its run function is called."""
    parser = argparse.ArgumentParser(prog="hayabusa", description="Fast GPT-NeoX-Japanese inference.")
    parser.add_argument("--version", action="version", version=f"hayabusa {version('hayabusa')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen_parser, run = None, None
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help, formatter_class=HelpFormatter)
        if name == chosen:
            _function(command.add_arguments)(sub)
            chosen_parser = sub
            run = _runner(command.run)
    return parser, chosen_parser, run


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (0 ok, 1 error, 2 usage error, 130 interrupted, 141 stdout closed)."""
    argv = sys.argv[1:] if argv is None else argv
    parser, command_parser, run = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)  # --help and --version exit here, before torch loads
    if run is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:  # argparse would blame the top-level parser and print its usage, not the command's
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    import torch

    if not torch.cuda.is_available():
        # No GPU: Triton kernels (verify, --backend triton) can still run, slowly, under Triton's CPU
        # interpreter, which must be chosen before any kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    prefix = f"hayabusa {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(prefix)
        try:
            if hasattr(args, "device"):  # checked before anything loads; the command resolves it again where it
                resolve_device(args.device)  # runs (a Ray deployment picks its default from the cluster's GPUs)
            status = run(args)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's own flush at exit
            return status
        except (ValueError, OSError) as err:  # bad input, missing or unreadable files (FileNotFoundError too)
            if isinstance(err, BrokenPipeError):
                return _reader_gone()
            print(f"{prefix}: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def _warning_printer(prefix: str) -> Callable[..., None]:
    """hayabusa's own warnings as `hayabusa COMMAND: warning: ...`; others (torch's, ...) as Python prints them."""
    show = warnings.showwarning

    def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__module__.startswith("hayabusa."):
            print(f"{prefix}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return print_warning


def _reader_gone() -> int:
    """stdout's reader closed the pipe (`| head`): stop quietly. Python would flush stdout again at exit and
    report the broken pipe once more, so stdout is pointed at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file descriptor (captured in process): nothing will flush it
        pass
    return SIGPIPE_STATUS
