"""Kernel tests: every output, cache and kernel-allocated buffer lies inside guard bands checked bit for bit, and
under the CPU interpreter every load and store is checked against the launch's tensors (interpreter_memcheck)."""

import pytest

from tolerance import GuardRegistry


@pytest.fixture(autouse=True)
def guards(monkeypatch) -> GuardRegistry:
    """The test's guarded tensors; torch.empty / empty_like hand out guarded, NaN-filled memory meanwhile.

    Tests call `guards.check()` right after a kernel call; teardown checks once more, so no test escapes it.
    """
    registry = GuardRegistry()
    registry.patch_allocations(monkeypatch)
    yield registry
    registry.check()


@pytest.fixture(autouse=True)
def _memcheck_every_launch(interpreter_memcheck) -> None:
    """Out-of-bounds loads and stores fail the launch (tests/conftest.py's interpreter_memcheck)."""
