"""Kernel tests: every output, cache and kernel-allocated buffer lies inside guard bands checked bit for bit, and
under the CPU interpreter every load and store is checked against the launch's tensors (interpreter_memcheck).

Every test runs with each of devices.GUARD_ALIGNMENTS: on a GPU with bands that keep its tensors 16-byte aligned
(the kernel variants the engine runs) and with odd ones (the scalar-load variants), all the aligned tests first, so a
run cut short (the first light's kernel-test stage) has tested the engine's variants.
"""

import pytest

import tolerance
from devices import GUARD_ALIGNMENTS
from tolerance import GuardRegistry


@pytest.fixture(autouse=True, params=GUARD_ALIGNMENTS)
def guards(request, monkeypatch) -> GuardRegistry:
    """The test's guarded tensors; torch.empty / empty_like hand out guarded, NaN-filled memory meanwhile.

    Tests call `guards.check()` right after a kernel call; teardown checks once more, so no test escapes it.
    """
    monkeypatch.setattr(tolerance, "aligned_guards", request.param == "aligned")
    registry = GuardRegistry()
    registry.patch_allocations(monkeypatch)
    yield registry
    registry.check()


@pytest.fixture(autouse=True)
def _memcheck_every_launch(interpreter_memcheck) -> None:
    """Out-of-bounds loads and stores fail the launch (tests/conftest.py's interpreter_memcheck)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The aligned variant of every kernel test before any odd one (a stable sort: files keep their order)."""
    def odd_first_key(item: pytest.Item) -> int:
        callspec = getattr(item, "callspec", None)
        return int(callspec is not None and callspec.params.get("guards") == "odd")

    items.sort(key=odd_first_key)
