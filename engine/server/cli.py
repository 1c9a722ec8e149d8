"""`hayabusa serve`: the OpenAI-compatible server under uvicorn, or `--ray` as a Ray Serve deployment.

Imports only argparse-level modules at load time; the server's dependencies load when the command runs, so a
missing extra is one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from hayabusa.engine.config import DTYPES
from hayabusa.engine.devices import add_device_argument
from hayabusa.engine.model_spec import add_model_arguments

DEFAULT_PORT = 8000
DEFAULT_MAX_WAITING = 1024


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


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine flags `serve` and `batch` share (--model, --revision and --device as every command spells them)."""
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--backend", choices=("reference", "triton"), default=None,
                        help="triton: the kernels; reference: plain-PyTorch ops (default: triton on cuda, else "
                             "reference)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--kv-cache-blocks", type=positive_int, default=None,
                        help="KV-cache pool size in blocks of 16 tokens (default: from free GPU memory)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    parser.add_argument("--max-waiting", type=positive_int, default=DEFAULT_MAX_WAITING,
                        help=f"requests allowed to wait for the engine; beyond it the server answers 429 (default: "
                             f"{DEFAULT_MAX_WAITING})")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests decoded in one step")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = parser.add_argument_group("Ray Serve (pip install 'hayabusa[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve replicas with Ray Serve (one GPU each on cuda)")
    ray.add_argument("--replicas", type=positive_int, default=1, help="fixed number of replicas")
    ray.add_argument("--min-replicas", type=positive_int, default=None, help="autoscale from this many replicas")
    ray.add_argument("--max-replicas", type=positive_int, default=None, help="autoscale up to this many replicas")


def settings_from_args(args: argparse.Namespace):
    from hayabusa.engine.server.replica import ServerSettings

    return ServerSettings(model=args.model, revision=args.revision, served_model_name=args.served_model_name,
                          backend=args.backend, device=args.device, dtype=args.dtype,
                          kv_cache_blocks=args.kv_cache_blocks, max_num_seqs=args.max_num_seqs,
                          max_waiting=args.max_waiting)


def run(args: argparse.Namespace) -> int:
    require("uvicorn", "starlette", "prometheus_client", "pydantic", extra="serve")
    settings = settings_from_args(args)
    if args.ray:
        scaling = Scaling(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas)
        require("ray", extra="ray")
        from hayabusa.engine.server.ray_serve import serve_on_ray

        serve_on_ray(settings, scaling, host=args.host, port=args.port)
        return 0
    import uvicorn

    from hayabusa.engine.server.replica import build_server

    uvicorn.run(build_server(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def require(*modules: str, extra: str) -> None:
    """Exit with one line naming the pip extra when one of `modules` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed; pip install 'hayabusa[{extra}]'")
