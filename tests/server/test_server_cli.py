"""`hayabusa serve` flags become the replica's settings and engine; the core CLI never imports the server's
dependencies."""

import inspect
import subprocess
import sys

import pytest

from hayabusa.engine import model_runner
from hayabusa.engine.cli import build_parser, main
from hayabusa.engine.llm_engine import PagedEngine
from hayabusa.engine.server.cli import Scaling, settings_from_args
from hayabusa.engine.server.replica import ServerSettings, load_paged_engine


def parse(argv: list[str]):
    parser, _, _ = build_parser(argv)
    return parser.parse_args(argv)


def test_serve_flags_become_settings() -> None:
    args = parse(["serve", "--model", "tiny", "--backend", "reference", "--kv-cache-blocks", "32",
                  "--max-waiting", "7", "--served-model-name", "hayabusa-tiny", "--port", "9000"])
    settings = settings_from_args(args)
    assert (settings.model, settings.model_name, settings.backend) == ("tiny", "hayabusa-tiny", "reference")
    assert (settings.kv_cache_blocks, settings.max_waiting, args.port, args.host) == (32, 7, 9000, "127.0.0.1")
    assert settings_from_args(parse(["serve", "--model", "tiny"])).max_waiting == 1024


@pytest.mark.parametrize("device", [None, "cpu"])
def test_serve_receives_the_device_flag_as_given(device, monkeypatch) -> None:
    """The CLI checks --device but passes the flag on unchanged: `serve --ray` picks its default from the cluster
    (None) and reads the name as a string (a torch.device once broke it)."""
    from hayabusa.engine import cli
    from hayabusa.engine.server import cli as serve_cli

    seen = []
    monkeypatch.setattr(serve_cli, "run", lambda args: seen.append(settings_from_args(args).device) or 0)
    assert cli.main(["serve", "--model", "tiny", "--ray", *(["--device", device] if device else [])]) == 0
    assert seen == [device]


@pytest.mark.parametrize("argv", [["--max-waiting", "0"], ["--kv-cache-blocks", "-3"], ["--backend", "cuda"]])
def test_bad_serve_flags_are_refused_by_the_parser(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "tiny", *argv])
    assert "error:" in capsys.readouterr().err


def test_ray_scaling_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="both --min-replicas and --max-replicas"):
        Scaling(min_replicas=2)
    with pytest.raises(ValueError, match="--min-replicas 3 is above --max-replicas 2"):
        Scaling(min_replicas=3, max_replicas=2)


def test_the_core_cli_loads_no_server_dependency() -> None:
    code = ("import sys; from hayabusa.engine.cli import build_parser; build_parser(['generate']); "
            "build_parser(['batch']); heavy = {'starlette', 'uvicorn', 'prometheus_client', 'ray', 'pydantic'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("backend", "op_set"), [("reference", "torch"), ("triton", "triton")])
def test_both_backends_serve_the_paged_engine(backend, op_set) -> None:
    engine = load_paged_engine(ServerSettings(model="tiny", backend=backend, device="cpu", kv_cache_blocks=8))
    assert isinstance(engine, PagedEngine) and engine.model.ops.name == op_set
    assert engine.stats().num_blocks == 8


def test_serve_help_shows_every_default(capsys) -> None:
    """Before: --host, --port and --log-level showed none; --kv-cache-blocks said "from free GPU memory" on a CPU."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "0: a free port, which the log names (not with --ray) (default: 8000)",
                  "uvicorn's log level (default: info)", "answers 429 (default: 1024)"):
        assert shown in help_text
    gpu_fraction = inspect.signature(PagedEngine).parameters["gpu_memory_utilization"].default
    assert (gpu_fraction, model_runner.CPU_KV_MEMORY_FRACTION) == (0.9, 0.5)  # as the help says in words
    assert ("(default: on cuda, what 90% of the GPU's memory leaves after the weights and activations; on cpu, room "
            f"for {model_runner.CPU_DEFAULT_SEQUENCES} sequences of the full context length, fewer if half the "
            "available RAM cannot hold them)") in help_text
