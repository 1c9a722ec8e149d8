"""First light's preflight: what this machine is, printed as one JSON line (versions, the GPU, its SMs and free
memory, the driver, the work directory's free disk); exit status 1, with the reason on stderr, when --device cuda
finds no GPU the run can use (none visible to torch, or older than sm_80).

Run by path (`python3 bench/first_light/probe.py --device cuda --work DIR`) before hayabusa is installed: it
imports torch and nothing of hayabusa.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = ("torch", "triton", "transformers", "accelerate", "safetensors", "setuptools", "matplotlib")
MIN_CAPABILITY = (8, 0)  # the kernels' bf16 and tensor-core paths


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def gpu_facts() -> tuple[dict, list[str]]:
    """(facts about GPU 0, problems that stop a GPU run)."""
    import torch

    if not torch.cuda.is_available():
        return {}, [f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no driver); "
                    "bench/gpu_first_light.sh --cpu-smoke runs the same stages on a CPU"]
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    facts = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
             "multiprocessors": props.multi_processor_count, "memory_gib": round(total / 2**30, 1),
             "free_memory_gib": round(free / 2**30, 1), "l2_cache_mib": round(props.L2_cache_size / 2**20, 1),
             "cuda_runtime": torch.version.cuda, "driver": driver_version(), "visible_gpus": torch.cuda.device_count()}
    problems = []
    if (props.major, props.minor) < MIN_CAPABILITY:
        problems.append(f"{props.name} is sm_{props.major}{props.minor}; hayabusa's kernels need sm_80 or newer")
    return facts, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--work", required=True, help="the run's work directory (its free disk is reported)")
    args = parser.parse_args(argv)
    facts: dict = {"versions": package_versions(), "platform": platform.platform(),
                   "work_free_gib": round(shutil.disk_usage(args.work).free / 2**30, 1)}
    problems: list[str] = []
    if facts["versions"]["torch"] is None:
        problems.append("torch is not installed: the run needs the machine's own torch, triton and transformers")
    elif args.device == "cuda":
        facts["gpu"], problems = gpu_facts()
    print(json.dumps({**facts, "problems": problems}), flush=True)
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
