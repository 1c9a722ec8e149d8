"""`hayabusa serve` flags become the replica's settings and engine; the core CLI never imports the server's
dependencies."""

import inspect
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from hayabusa.engine.cli import main
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.server import listen, replica
from hayabusa.engine.server.cli import Scaling, settings_from_args
from hayabusa.engine.server.listen import listening_sockets
from hayabusa.engine.server.replica import ServerSettings, load_paged_engine
from hayabusa.engine.worker import kv_cache

from server_harness import parse


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


def test_serve_and_batch_quantize_while_loading() -> None:
    from hayabusa.engine.server.batch import EngineSpec

    settings = settings_from_args(parse(["serve", "--model", "tiny", "--quantization", "int8", "--backend",
                                         "reference", "--kv-cache-blocks", "8"]))
    engine = load_paged_engine(settings)
    layer_linears = 4 * engine.model.config.num_hidden_layers  # the LM head stays dense
    assert settings.quantization == "int8" and engine.model.weight_schemes == {"W8A16_CHANNEL": layer_linears}
    batch_engine = EngineSpec(model="tiny", backend="reference", kv_cache_blocks=8, quantization="int8").load()
    assert batch_engine.paged.model.weight_schemes == {"W8A16_CHANNEL": layer_linears}
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, .* got 'int2'"):
        ServerSettings(model="tiny", quantization="int2")


def test_serve_help_shows_every_default(capsys) -> None:
    """Before: --host, --port and --log-level showed none; --kv-cache-blocks said "from free GPU memory" on a CPU."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "0: a free port, which the log names (not with --ray) (default: 8000)",
                  "one access line per request, with its id) (default: info)", "answers 429 (default: 1024)",
                  "refused (413) before it is parsed (default: 4194304)", "then exit 0 (default: 25.0)",
                  "max_tokens for each prompt (default: 262144)", "(default: the model's positions)",
                  "(default: $HAYABUSA_API_KEY;"):
        assert shown in help_text
    gpu_fraction = inspect.signature(PagedEngine).parameters["gpu_memory_utilization"].default
    assert (gpu_fraction, kv_cache.CPU_KV_MEMORY_FRACTION) == (0.9, 0.5)  # as the help says in words
    assert ("(default: on cuda, what 90% of the GPU's memory leaves after the weights and activations; on cpu, room "
            f"for {kv_cache.CPU_DEFAULT_SEQUENCES} sequences of the full context length, fewer if half the "
            "available RAM cannot hold them)") in help_text


# --- the port: checked and opened before the model loads (issue 16) ----------------------------------------------

@pytest.fixture
def nothing_loads(monkeypatch):
    def loaded(settings, engine=None):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(replica, "build_server", loaded)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(port, capsys, nothing_loads) -> None:
    """Before: --port 70000 listened on 4464 (70000 mod 65536) while the log said 70000."""
    with pytest.raises(SystemExit) as exit_status:
        main(["serve", "--model", "tiny", "--port", port])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"hayabusa serve: error: argument --port: must be a port number in 0-65535 (0: a free port), got {port}\n")


def test_a_port_in_use_fails_before_the_model_loads(capsys, nothing_loads) -> None:
    """Before: uvicorn's "[Errno 98] ... address already in use" and exit status 3, after the whole model load."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "tiny", "--port", str(port)]) == 1
    assert capsys.readouterr().err == (f"hayabusa serve: error: cannot listen on 127.0.0.1:{port}: Address already in "
                                       f"use; another process listens there: pick another --port, or --port 0 for a "
                                       f"free one\n")


def test_serve_listens_before_the_model_loads_and_lets_go_after(monkeypatch, capsys) -> None:
    opened = []

    def recorded(host, port):
        opened.extend(listening_sockets(host, port))
        return opened

    def loading(settings, engine=None):
        with socket.create_connection(opened[0].getsockname()[:2], timeout=5):  # the port already takes connections
            raise ValueError("the model failed to load")

    monkeypatch.setattr(listen, "listening_sockets", recorded)
    monkeypatch.setattr(replica, "build_server", loading)
    assert main(["serve", "--model", "tiny", "--port", "0"]) == 1
    assert capsys.readouterr().err == "hayabusa serve: error: the model failed to load\n"
    assert opened and all(sock.fileno() == -1 for sock in opened)  # closed again


def test_ray_needs_a_named_port(capsys, nothing_loads) -> None:
    assert main(["serve", "--model", "tiny", "--ray", "--port", "0"]) == 1
    assert "--port 0 (a free port) does not work with --ray" in capsys.readouterr().err


def test_serve_on_a_free_port_names_it_and_answers() -> None:
    command = [shutil.which("hayabusa"), "serve", "--model", "tiny", "--device", "cpu", "--port", "0",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        url = re.fullmatch(r"hayabusa: serving tiny on (http://127\.0\.0\.1:\d+); Ctrl-C stops\n", first)
        assert url, first
        deadline = time.monotonic() + 60
        while True:  # the engine loop starts with the app
            try:
                assert httpx.get(f"{url.group(1)}/health", timeout=5).json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in err, err  # Ctrl-C drains (nothing in flight) and exits 0
