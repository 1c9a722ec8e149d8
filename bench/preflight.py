"""What `hayabusa bench` checks before any model loads: the output directory and the optional packages.

A run takes minutes to hours; a problem these checks can see must not wait for its end. A missing optional
package is a warning when it only drops part of the output (matplotlib: the plot; transformers: the engines to
compare with) and an error when the user named an engine that needs it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

BENCH_INSTALL_HINT = 'pip install "hayabusa[bench]"'
TRANSFORMERS_ENGINES = ("transformers-eager", "transformers-compile")


class BenchWarning(UserWarning):
    """Something the run will leave out; printed as `hayabusa bench: warning: ...`."""


def prepare_out_dir(out: Path) -> None:
    """Create --out (and its parents) now, or raise ValueError naming it and why it cannot hold the results."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: results.json, results.md and results.png "
                         "go into a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the directory is not writable")


def plot_library_missing() -> str | None:
    """Why results.png cannot be drawn here, or None when it can."""
    try:
        import matplotlib  # noqa: F401 - only whether it imports
    except ImportError as err:
        return (f"matplotlib is not importable ({err}): results.png will not be drawn; {BENCH_INSTALL_HINT} "
                "(or pip install matplotlib)")
    return None


def check_optional_packages(engines: tuple[str, ...], engines_requested: bool, scenarios: tuple[str, ...]) -> bool:
    """Warn of what a missing optional package leaves out, or raise ValueError if a named engine needs it; whether
    results.png can be drawn."""
    if not _importable("transformers"):
        needing = [e for e in engines if e in TRANSFORMERS_ENGINES]
        if engines_requested and needing:
            raise ValueError(f"--engines {' '.join(needing)}: transformers is not installed; {BENCH_INSTALL_HINT}")
        if needing or "tokenizer" in scenarios:
            warnings.warn("transformers is not installed: its engines and tokenizer are skipped, so nothing is "
                          f"compared with hayabusa; {BENCH_INSTALL_HINT}", BenchWarning, stacklevel=2)
    plot_missing = plot_library_missing()
    if plot_missing:
        warnings.warn(plot_missing, BenchWarning, stacklevel=2)
    return plot_missing is None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (import blocked)
        return False
