"""The `hayabusa` command end to end on a tiny random checkpoint, in process and through the console script."""

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hayabusa
from hayabusa.bench.workloads import SIZES
from hayabusa.engine.api import Engine
from hayabusa.engine.cli import COMMANDS, SIGPIPE_STATUS, build_parser, flag_of, main
from hayabusa.engine.core import paged_engine
from hayabusa.engine.loading import random_models
from hayabusa.engine.loading.checkpoint_writer import FORMATS
from hayabusa.engine.loading.config import DTYPES
from hayabusa.engine.model.op_sets import OP_SETS
from hayabusa.engine.param_names import respelled
from hayabusa.engine.platform import devices
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import hub


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["init-random", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    return out


def test_init_random_writes_the_real_config_keys(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_neox_japanese"
    assert {"rotary_pct", "rotary_emb_base"} <= set(config)
    assert (tiny_dir / "vocab.txt").is_file() and (tiny_dir / "emoji.json").is_file()


def test_generate_streams_text_and_is_repeatable(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "12", "--ignore-eos"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.endswith("\n") and len(first.strip()) > 0


def test_generate_reports_bad_input_without_a_traceback(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_dir), "猫", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert "temperature must be a number in [0, " in err and "Traceback" not in err
    assert main(["generate", "--model", str(tiny_dir / "missing"), "猫"]) == 1
    assert "missing" in capsys.readouterr().err


def test_generate_quantizes_while_loading(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "8", "--ignore-eos"]
    assert main([*args, "--quantization", "int8"]) == 0
    engine = Engine.from_pretrained(tiny_dir, quantization="W8A16_CHANNEL")
    expected = engine.generate("吾輩は猫である", max_new_tokens=8, ignore_eos=True)[0].text
    assert capsys.readouterr().out == expected + "\n"
    assert main([*args, "--quantization", "int4"]) == 1  # tiny's 160 columns are no whole number of groups
    assert "quantization W4A16 quantizes in groups of 128 columns, but 'gpt_neox_japanese.layers.0.attention" \
           ".query_key_value.weight' has 160" in capsys.readouterr().err


def test_generate_takes_transformers_options_and_prints_beams_best_first(tiny_dir: Path, capsys) -> None:
    from hayabusa.engine.api import Engine

    options = ["--num-beams", "3", "--num-return-sequences", "2", "--no-repeat-ngram-size", "2", "--bad-word", "の",
               "--min-new-tokens", "4", "--length-penalty", "0.5", "--early-stopping", "never"]
    assert main(["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "10", *options]) == 0
    out = capsys.readouterr().out
    engine = Engine.from_pretrained(tiny_dir)
    expected = engine.generate("吾輩は猫である", max_new_tokens=10, num_beams=3, num_return_sequences=2,
                               no_repeat_ngram_size=2, bad_words_ids=[engine.tokenizer.encode("の")],
                               min_new_tokens=4, length_penalty=0.5, early_stopping="never")
    assert out == "".join(f"[{i}] (score {o.score:.4f})\n{o.text}\n" for i, o in enumerate(expected))
    assert expected[0].score >= expected[1].score
    assert main(["generate", "--model", str(tiny_dir), "猫", "--num-beams", "2", "--do-sample"]) == 1
    assert "--do-sample=True is not supported with --num-beams > 1" in capsys.readouterr().err


def test_generate_takes_openai_options_and_prints_best_of_candidates(tiny_dir: Path, capsys) -> None:
    engine = Engine.from_pretrained(tiny_dir)
    options = ["--presence-penalty", "0.5", "--frequency-penalty", "1", "--logit-bias", "15=2.5", "--logit-bias",
               "7=-100"]
    assert main(["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "8", *options]) == 0
    expected = engine.generate("吾輩は猫である", max_new_tokens=8, presence_penalty=0.5, frequency_penalty=1.0,
                               logit_bias={15: 2.5, 7: -100.0})[0]
    assert capsys.readouterr().out == expected.text + "\n"
    sampled = ["--do-sample", "--seed", "4", "--best-of", "3", "--num-return-sequences", "2"]
    assert main(["generate", "--model", str(tiny_dir), "吾輩は猫である", "--max-new-tokens", "8", *sampled]) == 0
    best = engine.generate("吾輩は猫である", max_new_tokens=8, do_sample=True, seed=4, best_of=3,
                           num_return_sequences=2)
    assert capsys.readouterr().out == "".join(f"[{i}] (logprob {o.cumulative_logprob:.4f})\n{o.text}\n"
                                              for i, o in enumerate(best))
    assert main(["generate", "--model", str(tiny_dir), "猫", "--logit-bias", "15=200"]) == 1
    assert "error: --logit-bias[15] must be a number in [-100, 100], got 200.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        main(["generate", "--model", str(tiny_dir), "猫", "--logit-bias", "15"])
    assert exit_status.value.code == 2 and "TOKEN_ID=BIAS (e.g. 50256=-100), got '15'" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    exe = shutil.which("hayabusa")
    assert exe is not None, "the hayabusa console script is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "tokenize", "init-random", "verify", "bench"):
        assert command in result.stdout


# --- what a newcomer hit (issue 10.4) -----------------------------------------------------------------------------

DEVICE_COMMANDS = {  # every command that takes --device, with what it needs besides
    "generate": ["generate", "x", "--model", "tiny"],
    "verify": ["verify", "--model", "tiny"],
    "bench": ["bench", "--model", "tiny", "--out", "unused"],
}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Resolving the preset `tiny` fails the test: errors must come before any loading."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was resolved before the error")

    monkeypatch.setattr(random_models, "random_preset_dir", loaded)


@pytest.fixture
def cuda_build_with_two_gpus(monkeypatch):
    """What torch reports on a CUDA machine with two devices (for the index check, on any machine)."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize(("device", "message"), [
    ("tpu", "device 'tpu' is not a device name; use cpu, cuda or cuda:N"),
    ("mps", "device 'mps': hayabusa runs on cpu or cuda (cuda:N), not mps"),
    ("cuda:3", "device 'cuda:3': only 2 CUDA device(s) visible, cuda:0 to cuda:1"),
])
def test_a_bad_device_is_one_clear_error_before_anything_loads(command, device, message, capsys, nothing_loads,
                                                                cuda_build_with_two_gpus):
    assert main([*DEVICE_COMMANDS[command], "--device", device]) == 1
    assert capsys.readouterr().err == f"hayabusa {command}: error: {message}\n"


def test_cuda_without_cuda_is_named_for_what_is_missing(monkeypatch, nothing_loads, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert main([*DEVICE_COMMANDS["generate"], "--device", "cuda"]) == 1
    assert f"device 'cuda': this torch ({torch.__version__}) is built without CUDA" in capsys.readouterr().err
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main([*DEVICE_COMMANDS["verify"], "--device", "cuda"]) == 1
    assert "device 'cuda': torch sees no CUDA device on this machine" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device 'cuda': torch sees no CUDA device"):  # the library checks first too
        Engine.from_pretrained("tiny", device="cuda")


@pytest.mark.parametrize("command", ["generate", "tokenize", "verify", "bench"])
def test_every_command_takes_the_same_model_source(command, capsys, monkeypatch):
    args = {"generate": ["generate", "x"], "tokenize": ["tokenize", "x"], "verify": ["verify"],
            "bench": ["bench", "--out", "unused"]}[command]
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: pytest.fail("a bad name went to the Hub"))
    assert main([*args, "--model", "tinny"]) == 1
    assert capsys.readouterr().err == (
        f"hayabusa {command}: error: model 'tinny' is not a local directory, a random preset (2.7b, small, tiny) or a "
        "Hub repo id of the form 'owner/name' (e.g. 'abeja/gpt-neox-japanese-2.7b')\n")


def test_tokenize_takes_a_preset_without_asking_the_hub(capsys, monkeypatch):
    """Before: `--model tiny` went to the Hub as a repo id (~23 s of retries, then a failure)."""
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: pytest.fail("a preset went to the Hub"))
    assert main(["tokenize", "吾輩は猫である", "--model", "tiny"]) == 0
    assert capsys.readouterr().out.startswith("6 tokens\n[30014, 26883, 26638, 27228, 25, 26650]\n")


def test_an_unknown_flag_shows_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["generate", "x", "--model", "tiny", "--bogus"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2
    assert err.startswith("usage: hayabusa generate ") and "--max-new-tokens" in err
    assert err.endswith("hayabusa generate: error: unrecognized arguments: --bogus\n")


def test_generate_keeps_to_a_json_schema_regex_or_choices(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    schema = {"type": "object", "properties": {"答え": {"enum": ["はい", "いいえ"]}}, "required": ["答え"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema, ensure_ascii=False), encoding="utf-8")
    assert main(["generate", "--model", str(tiny_dir), "猫", "--json-schema", str(tmp_path / "schema.json")]) == 0
    assert json.loads(capsys.readouterr().out)["答え"] in ("はい", "いいえ")
    assert main(["generate", "--model", str(tiny_dir), "猫", "--choice", "はい", "--choice", "🐯 🍙"]) == 0
    assert capsys.readouterr().out in ("はい\n", "🐯 🍙\n")
    assert main(["generate", "--model", str(tiny_dir), "猫", "--regex", "[0-9]{9}", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().isdigit() and "warning: the output does not match the constraint yet: --max-new-tokens " \
                                         "ran out" in out.err
    assert main(["generate", "--model", str(tiny_dir), "猫", "--regex", "a(b"]) == 1
    assert "error: --regex: structured_outputs.regex is invalid" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "猫", "--json-schema", str(tmp_path / "missing.json")]) == 1
    assert f"error: --json-schema {tmp_path / 'missing.json'}: cannot read it" in capsys.readouterr().err


def test_generate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("tokens to generate at most (default: 64)", "sampling temperature (default: 1.0)",
                  "(0: all) (default: 0)", "(default: cuda when available, else cpu)",
                  "auto (the default): float16 on cuda; on cpu bfloat16 where the CPU computes bf16 natively"):
        assert shown in help_text
    assert "(default: None)" not in help_text and "(default: False)" not in help_text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0 and capsys.readouterr().out == f"hayabusa {version('hayabusa')}\n"
    assert hayabusa.__version__ == version("hayabusa")


def test_python_dash_m_hayabusa_is_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "hayabusa", "tokenize", "吾輩は猫である"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("6 tokens\n")


def test_the_triton_backend_on_a_cpu_warns_once(monkeypatch, capsys, tiny_dir):
    """Before: 3 minutes of silence for 20 tokens; the interpreter is a correctness check, not a way to generate."""
    class QuickEngine:  # stands in for the interpreted paged engine, which takes minutes
        def __init__(self, *args, **kwargs) -> None:
            self.model = SimpleNamespace(owns_weights=False)  # it reads the loaded weights in place

        def stream(self, prompt_ids, params, *, checked=False):
            yield "猫"

        def close(self) -> None:
            pass

    monkeypatch.setattr(devices, "_interpreter_warned", False)
    monkeypatch.setattr(paged_engine, "PagedEngine", QuickEngine)
    for _ in range(2):
        assert main(["generate", "x", "--model", str(tiny_dir), "--backend", "triton", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("hayabusa generate: warning: the Triton kernels run on this CPU under Triton's interpreter: "
                     "that checks their correctness and is very slow") == 1
    assert "the reference backend generates on a CPU at full speed" in err


def test_a_closed_pipe_ends_generate_quietly(tiny_dir: Path) -> None:
    """`hayabusa generate ... | head -c 10`: before, "error: [Errno 32] Broken pipe" and exit status 1."""
    command = [shutil.which("hayabusa"), "generate", "吾輩は猫である", "--model", str(tiny_dir),
               "--max-new-tokens", "400", "--ignore-eos", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()  # the reader goes away while generation goes on
    _, err = process.communicate(timeout=120)
    assert process.returncode == SIGPIPE_STATUS, err.decode()
    assert err.decode() == ""


# --- what a newcomer hit (issue 16) -------------------------------------------------------------------------------

def command_parser(command: str) -> argparse.ArgumentParser:
    _, parser, _ = build_parser([command])
    return parser


def option(command: str, flag: str) -> argparse.Action:
    return next(action for action in command_parser(command)._actions if flag in action.option_strings)


def test_help_imports_no_torch() -> None:
    """Before: 2-4 s for any --help, spent importing torch to print text."""
    code = ("import sys; from hayabusa.engine.cli import COMMANDS, main\n"
            "for argv in [['--help'], *([name, '--help'] for name in COMMANDS)]:\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, argv\n"
            "print(sorted({'torch', 'transformers', 'triton'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"
    assert "usage: hayabusa batch " in result.stdout  # every command's help was printed


@pytest.mark.parametrize(("command", "flag", "choices"), [
    ("verify", "--ops", lambda: OP_SETS),
    ("init-random", "--format", lambda: FORMATS),
    ("bench", "--sizes", lambda: ("auto", *SIZES)),
    ("serve", "--dtype", lambda: ("auto", *DTYPES)),
])
def test_choices_spelled_out_for_a_light_help_match_the_library(command, flag, choices) -> None:
    assert tuple(option(command, flag).choices) == choices()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_says_its_default(command) -> None:
    """Before: serve's --host, --port and --log-level showed no default. An option says its default in its help
    text or has one for the formatter to show; None and False defaults are worth words, not "(default: None)"."""
    parser = command_parser(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.required or action.default == [] \
                or isinstance(action, argparse._StoreTrueAction):  # off unless given; append: none unless given
            continue
        shown = action.default is not None and action.default is not False
        assert action.help and (shown or "default" in action.help), (command, action.option_strings)
    help_text = " ".join(parser.format_help().split())
    assert "(default: None)" not in help_text and "(default: False)" not in help_text


@pytest.mark.parametrize(("argv", "argument"), [
    (["generate", "--model", "tiny", "ab\udcff"], "argument prompt"),
    (["generate", "--model", "tiny", "x", "--stop", "ab\udcff"], "argument --stop"),
    (["generate", "--model", "tiny", "x", "--bad-word", "ab\udcff"], "argument --bad-word"),
    (["tokenize", "ab\udcff"], "argument text"),
    (["verify", "--model", "tiny", "--prompt", "ab\udcff"], "argument --prompt"),
])
def test_text_that_is_not_utf8_is_named_before_anything_loads(argv, argument, capsys, nothing_loads) -> None:
    """Before: "text holds the lone surrogate U+DCFF", Python's stand-in for the byte 0xff it could not decode."""
    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f": error: {argument}: not valid UTF-8: byte 0xff at offset 2; pass the text in UTF-8\n")
    assert "surrogate" not in err


def test_a_real_non_utf8_argument_is_named_as_bytes() -> None:
    result = subprocess.run([shutil.which("hayabusa"), "tokenize", b"caf\xe9"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.endswith("hayabusa tokenize: error: argument text: not valid UTF-8: byte 0xe9 at offset 3; "
                                  "pass the text in UTF-8\n")


@pytest.mark.parametrize(("argv", "argument"), [
    (["verify", "--model", "tiny", "--prompt", ""], "argument --prompt"),
    (["generate", "--model", "tiny", ""], "argument prompt"),
    (["generate", "--model", "tiny", "x", "--stop", ""], "argument --stop"),
])
def test_an_empty_prompt_is_called_empty(argv, argument, capsys, nothing_loads) -> None:
    """Before: verify blamed the context length ("prompt '' has 0 tokens; ... must fit max_position_embeddings")."""
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().err.endswith(f": error: {argument}: is empty; give at least one character\n")


@pytest.mark.parametrize(("options", "message"), [
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences (3) must be <= --num-beams (2)"),
    (["--bad-word", "の" * 20], "--bad-word holds a word of 20 tokens; at most 16 are supported"),
    (["--max-new-tokens", "600"], "1 prompt tokens + --max-new-tokens 600 = 601 exceed the context length 512"),
])
def test_errors_name_the_flags_the_user_typed(tiny_dir, capsys, options, message) -> None:
    """Before: the Python API's names (bad_words_ids for --bad-word, max_new_tokens, ...)."""
    assert main(["generate", "x", "--model", str(tiny_dir), *options]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hayabusa generate: error: ") and message in err


def test_every_sampling_flag_is_the_name_errors_use() -> None:
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    for action in command_parser("generate")._actions:
        if action.dest in fields:
            assert flag_of(action.dest) in action.option_strings
    assert flag_of("bad_words_ids") in option("generate", "--bad-word").option_strings


def test_respelling_spares_quoted_values_and_longer_names() -> None:
    message, first = respelled("stop must hold non-empty strings, got ('top_k', 'early_stopping')", flag_of)
    assert (message, first) == ("--stop must hold non-empty strings, got ('top_k', 'early_stopping')", "--stop")
    assert respelled("early_stopping must be True, False or 'never'", flag_of)[0] == \
        "--early-stopping must be True, False or 'never'"
    assert respelled("the model 'x' does not exist", flag_of) == ("the model 'x' does not exist", None)
