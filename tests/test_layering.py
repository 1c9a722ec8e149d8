"""Which way imports point: kernels and tokenizer import nothing of the engine, the engine nothing of the benchmarks;
the oracle imports nothing of the fast path (the paged model, the worker, the scheduler and loop), and the fast path
and the rooms around it nothing of the oracle, so that checking one against the other means something. `hayabusa
verify` is the one oracle module that runs both. Lazy imports inside functions count too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST_PATH = ("hayabusa.engine.model", "hayabusa.engine.worker", "hayabusa.engine.core")
ORACLE = "hayabusa.engine.oracle"


def imported_modules(path: Path) -> set[str]:
    """Every hayabusa module a file imports, at the top or inside a function (relative imports resolved)."""
    package = "hayabusa." + ".".join(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: x within the file's package (or its parents)
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("hayabusa.")}


def files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in paths for name in sorted(imported_modules(path))
            if name.startswith(forbidden)]


@pytest.mark.parametrize("folder", ["kernels", "tokenizer"])
def test_kernels_and_tokenizer_import_nothing_of_the_engine(folder):
    assert offending(files(folder), ("hayabusa.engine", "hayabusa.bench")) == []


def test_the_engine_imports_nothing_of_the_benchmarks():
    assert offending(files("engine"), ("hayabusa.bench",)) == []


def test_the_oracle_imports_nothing_of_the_fast_path():
    oracle = [path for path in files("engine/oracle") if path.name != "verify.py"]
    assert oracle and offending(oracle, FAST_PATH) == []


def test_the_fast_path_imports_nothing_of_the_oracle():
    rooms = files("engine/model", "engine/worker", "engine/core", "engine/sample", "engine/decoding", "engine/loading")
    assert offending(rooms, (ORACLE,)) == []
