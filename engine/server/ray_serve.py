"""`hayabusa serve --ray`: the same ASGI app in every replica of a Ray Serve deployment (one GPU each on CUDA).

Each replica loads its own paged engine and runs its own engine loop; Ray Serve's proxy spreads the HTTP
requests over them. /metrics answers for the replica that took the scrape.
"""

from __future__ import annotations

import time
from dataclasses import replace

import ray
from ray import serve

from hayabusa.engine.server.cli import Scaling
from hayabusa.engine.server.replica import ServerSettings, build_server

APP_NAME = "hayabusa"
# Ray Serve's default of 5 ongoing requests per replica would starve continuous batching: a replica takes as many
# as its engine accepts (running + waiting), and autoscaling aims at half a full batch per replica.
TARGET_BATCH_FRACTION = 0.5


@serve.ingress()
class HayabusaReplica:
    """One replica: builds the app (and so loads the engine) in the replica process."""

    def __init__(self, settings: ServerSettings) -> None:
        self._app = build_server(settings)

    def __serve_build_asgi_app__(self):
        return self._app


def deployment_app(settings: ServerSettings, scaling: Scaling) -> serve.Application:
    """The bound deployment. Call after ray.init(): the device default comes from the cluster's GPUs."""
    device = settings.device or ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")
    settings = replace(settings, device=device)
    on_gpu = device.startswith("cuda")
    options = dict(
        name=APP_NAME,
        ray_actor_options={"num_gpus": 1} if on_gpu else {"num_cpus": 1},
        max_ongoing_requests=settings.max_num_seqs + settings.max_waiting,
    )
    if scaling.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": max(1, int(settings.max_num_seqs * TARGET_BATCH_FRACTION)),
        }
    else:
        options["num_replicas"] = scaling.replicas
    return serve.deployment(HayabusaReplica, **options).bind(settings)


def start(settings: ServerSettings, scaling: Scaling, *, host: str, port: int) -> None:
    """Start Ray (or join RAY_ADDRESS's cluster) and Serve, and deploy; returns once the replicas are up."""
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment_app(settings, scaling), name=APP_NAME, route_prefix="/")


def serve_on_ray(settings: ServerSettings, scaling: Scaling, *, host: str, port: int) -> None:
    """`hayabusa serve --ray`: deploy, then keep serving until interrupted."""
    start(settings, scaling, host=host, port=port)
    print(f"hayabusa: serving {settings.model_name} on http://{host}:{port} with Ray Serve; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
