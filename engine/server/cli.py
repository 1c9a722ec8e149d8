"""`hayabusa serve`: the OpenAI-compatible server under uvicorn, or `--ray` as a Ray Serve deployment; and the
flags of `hayabusa batch`, which shares the engine's.

Imports only argparse-level modules at load time (`--help` loads no torch); the server's dependencies load when the
command runs, so a missing extra is one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hayabusa.engine.loading.model_source import add_model_arguments
from hayabusa.engine.loading.quant_schemes import add_quantization_argument
from hayabusa.engine.platform.devices import add_device_argument
from hayabusa.engine.platform.dtypes import AUTO, DTYPE_CHOICES, DTYPE_HELP

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_PORT = 65535
DEFAULT_MAX_WAITING = 1024
# A full-context prompt is ~2,000 token ids (~15 KB of JSON); 4 MiB leaves room for batches of them and for long
# texts, and keeps a body that is a mistake or an attack from being parsed.
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
# Tokens one request may cost (prompt tokens + every sequence's max_tokens): 2**18 holds one full-context prompt of
# the 2.7B model (2,048 positions) with OpenAI's largest n (128), and no more.
DEFAULT_MAX_TOKENS_PER_REQUEST = 1 << 18
DEFAULT_GRACE_S = 25.0  # within the 30 s Kubernetes waits after SIGTERM before it kills the process
DEFAULT_BATCH_SIZE = 64
API_KEY_ENV = "HAYABUSA_API_KEY"


@dataclass(frozen=True)
class Scaling:
    """How many Ray Serve replicas: a fixed count, or autoscaling bounds."""

    replicas: int = 1  # fixed count, unless min/max ask for autoscaling
    min_replicas: int | None = None
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        low, high = self.min_replicas, self.max_replicas
        if (low is None) != (high is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if low is not None and low > high:
            raise ValueError(f"--min-replicas {low} is above --max-replicas {high}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def port_number(text: str) -> int:
    """--port: a TCP port number; 0 asks the system for a free port."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port number in 0-{MAX_PORT} (0: a free port), got {text}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine flags `serve` and `batch` share (--model, --revision and --device as every command spells them)."""
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--backend", choices=("reference", "triton"), default=None,
                        help="triton: the kernels; reference: plain-PyTorch ops (default: triton on cuda, else "
                             "reference)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    add_quantization_argument(parser)
    # The defaults are model_runner's pool sizing (CPU_DEFAULT_SEQUENCES, CPU_KV_MEMORY_FRACTION,
    # gpu_memory_utilization); that module imports torch, so they are spelled out here.
    parser.add_argument("--kv-cache-blocks", type=positive_int, default=None,
                        help="KV-cache pool size in blocks of 16 tokens (default: on cuda, what 90%% of the GPU's "
                             "memory leaves after the weights and activations; on cpu, room for 4 sequences of the "
                             "full context length, fewer if half the available RAM cannot hold them)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (0.0.0.0: every IPv4 interface, '::' every IPv6 one)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port to listen on; 0: a free port, which the log names (not with --ray)")
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    parser.add_argument("--max-waiting", type=positive_int, default=DEFAULT_MAX_WAITING,
                        help="requests allowed to wait for the engine; beyond it the server answers 429")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests decoded in one step")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="tokens one engine step computes: prompt chunks fill what the decoding requests leave "
                             "(default: 512)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="log level of the server and uvicorn (info: one access line per request, with its id)")
    limits = parser.add_argument_group("what one request may ask (each refusal is a 400 or 413 naming the flag)")
    limits.add_argument("--max-model-len", type=positive_int, default=None,
                        help="prompt tokens + max_tokens of a prompt (default: the model's positions)")
    limits.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="a larger request body is refused (413) before it is parsed")
    limits.add_argument("--max-tokens-per-request", type=positive_int, default=DEFAULT_MAX_TOKENS_PER_REQUEST,
                        help="tokens one request may cost: its prompt tokens + n (or best_of, or num_beams) x "
                             "max_tokens for each prompt")
    exposed = parser.add_argument_group("exposing the server")
    exposed.add_argument("--api-key", default=None,
                         help=f"every route but /health, /metrics, /version and /openapi.json needs the header "
                              f"'Authorization: Bearer KEY', else 401 (default: ${API_KEY_ENV}; unset: no key; the "
                              f"environment keeps it out of the process list)")
    exposed.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                         help="browser origins allowed to call the API (CORS), e.g. https://example.com, or '*' "
                              "(default: none, no CORS headers)")
    exposed.add_argument("--grace", type=non_negative_float, default=DEFAULT_GRACE_S, metavar="S",
                         help="on SIGTERM or SIGINT: new requests get 503, those running get S seconds to finish, "
                              "the rest end with finish_reason \"abort\"; then exit 0")
    ray = parser.add_argument_group("Ray Serve (pip install 'hayabusa[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve replicas with Ray Serve (one GPU each on cuda)")
    ray.add_argument("--replicas", type=positive_int, default=1, help="fixed number of replicas")
    ray.add_argument("--min-replicas", type=positive_int, default=None,
                     help="autoscale from this many replicas, with --max-replicas (default: --replicas, fixed)")
    ray.add_argument("--max-replicas", type=positive_int, default=None,
                     help="autoscale up to this many replicas, with --min-replicas (default: --replicas, fixed)")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """`hayabusa batch`'s flags (the command runs in batch.py, which imports the engine)."""
    add_engine_arguments(parser)
    parser.add_argument("--input", type=Path, required=True, help="jsonl: one {\"prompt\": ..., sampling fields} "
                        "per line")
    parser.add_argument("--output", type=Path, required=True,
                        help="jsonl: one result per input line, in order (written only when every line succeeded)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="lines handed to an engine at once")
    parser.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'hayabusa[ray]')")
    parser.add_argument("--replicas", type=positive_int, default=1, help="engines in Ray Data's actor pool")


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key, else $HAYABUSA_API_KEY; an empty one is an error (a deployment that meant a key and got none
    would otherwise serve everyone)."""
    if args.api_key is not None:
        if not args.api_key:
            raise ValueError("--api-key is empty: give a key, or leave the flag out for a server without one")
        return args.api_key
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key:
        raise ValueError(f"{API_KEY_ENV} is set but empty: give a key, or unset it for a server without one")
    return key


def settings_from_args(args: argparse.Namespace):
    from hayabusa.engine.server.replica import ServerSettings

    return ServerSettings(model=args.model, revision=args.revision, served_model_name=args.served_model_name,
                          backend=args.backend, device=args.device, dtype=args.dtype,
                          quantization=args.quantization, kv_cache_blocks=args.kv_cache_blocks,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
                          max_model_len=args.max_model_len, max_request_bytes=args.max_request_bytes,
                          max_tokens_per_request=args.max_tokens_per_request, api_key=api_key_from(args),
                          allowed_origins=tuple(args.allowed_origins or ()))


def run(args: argparse.Namespace) -> int:
    require("uvicorn", "starlette", "prometheus_client", "pydantic", extra="serve")
    settings = settings_from_args(args)
    if args.ray:
        if args.port == 0:
            raise ValueError("--port 0 (a free port) does not work with --ray: Ray Serve's proxy, not this process, "
                             "opens the port; name one")
        scaling = Scaling(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas)
        require("ray", extra="ray")
        from hayabusa.engine.server.ray_serve import serve_on_ray

        serve_on_ray(settings, scaling, host=args.host, port=args.port)
        return 0
    import uvicorn

    from hayabusa.engine.server.listen import listening_sockets
    from hayabusa.engine.server.replica import build_server
    from hayabusa.engine.server.shutdown import DrainingServer

    sockets = listening_sockets(args.host, args.port)  # before the model loads: a port in use fails at once
    try:
        app = build_server(settings)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                log_config=log_config(args.log_level), access_log=False)  # (ours names request ids)
        host = f"[{args.host}]" if ":" in args.host else args.host
        # (uvicorn logs no address for sockets it is handed; this names the port --port 0 got too)
        print(f"hayabusa: serving {settings.model_name} on http://{host}:{sockets[0].getsockname()[1]}; Ctrl-C "
              f"stops", flush=True)
        if settings.api_key is None and not is_loopback(args.host):
            print(f"hayabusa serve: warning: listening on {args.host} with no API key: anyone who reaches the port "
                  f"can use the model (--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        DrainingServer(config, app.state.drain, args.grace).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return 0


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def log_config(level: str) -> dict:
    """uvicorn's logging, plus hayabusa's server loggers (errors, the drain, the access log) on the same stream."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["hayabusa.server"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def require(*modules: str, extra: str) -> None:
    """Exit with one line naming the pip extra when one of `modules` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed; pip install 'hayabusa[{extra}]'")
