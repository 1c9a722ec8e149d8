"""Shared test set-up: without a GPU, Triton kernels run under Triton's CPU interpreter."""

import os

import pytest
import torch

from devices import ON_GPU

if not ON_GPU:
    # Must be set before any @triton.jit function is defined (i.e. before hayabusa.kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402 - after TRITON_INTERPRET is set

from interpreter_memcheck import InterpreterMemcheck  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _random_preset_cache(tmp_path_factory: pytest.TempPathFactory):
    """Random preset checkpoints (`--model tiny`) go to a temporary cache, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HAYABUSA_CACHE", str(tmp_path_factory.mktemp("hayabusa-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensor ops: one thread beats two fighting over a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def interpreter_memcheck():
    """While a module's tests run, every interpreted kernel launch fails on a load or store outside its tensors
    (tests/interpreter_memcheck.py); None on a GPU, where compute-sanitizer does this job."""
    if not triton.knobs.runtime.interpret:
        yield None
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        memcheck = InterpreterMemcheck()
        memcheck.install(monkeypatch)
        yield memcheck
