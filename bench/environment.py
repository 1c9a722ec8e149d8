"""Where a result came from: device, driver, package versions and the git commit of the code that ran."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

# The checkout's root when running from a checkout; site-packages/hayabusa in an installed copy (the folders below
# are installed as hayabusa.bench, hayabusa.engine, ...).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("bench", "engine", "kernels", "tokenizer")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return f"{cpu_model_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version(device: torch.device) -> str | None:
    """NVIDIA driver and the CUDA runtime torch was built with; None on a CPU."""
    if device.type != "cuda":
        return None
    runtime = f"CUDA runtime {torch.version.cuda}"
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10, check=True)
        return f"driver {query.stdout.split()[0]}, {runtime}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return runtime


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "hayabusa", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_origin(package_root: Path = PACKAGE_ROOT, cwd: Path | None = None) -> tuple[str | None, str]:
    """(git commit, where it was found) of the hayabusa code running now; the commit carries "-dirty" when tracked
    files differ from it. Found, in order: in the checkout the code runs from (an editable install); in a pip
    install from a git URL (its recorded commit); in the checkout in the current directory or the one pip installed
    from (`pip install .`), if the installed files equal its files. Otherwise None, and the sentence says which
    version runs."""
    version = package_versions()["hayabusa"]
    commit = _checkout_commit(package_root)
    if commit is not None:
        return commit, f"of the checkout the code runs from, {package_root}"
    direct_url = _direct_url()
    vcs_commit = direct_url.get("vcs_info", {}).get("commit_id")
    if vcs_commit:
        return vcs_commit, f"pip installed hayabusa {version} from {direct_url.get('url')} at this commit"
    installed_from = direct_url.get("url", "")
    candidates = [cwd or Path.cwd()] + ([Path(installed_from.removeprefix("file://"))]
                                        if installed_from.startswith("file://") else [])
    differing = []
    for checkout in dict.fromkeys(filter(None, map(_toplevel, candidates))):
        commit = _checkout_commit(checkout)
        if commit is None:
            continue
        if _installed_files_match(package_root, checkout):
            return commit, f"of the checkout {checkout}, whose files the installed hayabusa {version} equals"
        differing.append(f"{checkout} at {commit}")
    if differing:
        return None, (f"no commit known: the installed hayabusa {version} differs from the checkout "
                      f"{' and '.join(differing)}")
    return None, (f"no commit known: hayabusa {version} is an installed copy, not run from a git checkout (run "
                  "with its checkout as the current directory to record the commit)")


def _checkout_commit(root: Path) -> str | None:
    """HEAD of the git checkout whose top is `root` (not of a repository `root` merely lies inside)."""
    if _toplevel(root) != root.resolve():
        return None
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _toplevel(path: Path) -> Path | None:
    try:
        return Path(_git(path, "rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.SubprocessError):
        return None


def _installed_files_match(package_root: Path, checkout: Path) -> bool:
    """Every module of the installed hayabusa.{bench,engine,kernels,tokenizer} equals the checkout's file."""
    installed = [f for folder in PACKAGE_FOLDERS for f in (package_root / folder).rglob("*.py")]
    return bool(installed) and all(
        (checkout / f.relative_to(package_root)).is_file()
        and (checkout / f.relative_to(package_root)).read_bytes() == f.read_bytes() for f in installed)


def _direct_url() -> dict:
    """pip's record of where hayabusa was installed from (PEP 610's direct_url.json); {} when there is none."""
    try:
        text = metadata.distribution("hayabusa").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return {}
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
