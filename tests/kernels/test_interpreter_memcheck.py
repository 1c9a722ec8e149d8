"""The interpreter memcheck (tests/interpreter_memcheck.py) passes in-bounds kernels and fails stray accesses."""

import pytest
import torch
import triton
import triton.language as tl

from devices import ON_GPU
from interpreter_memcheck import OutOfBoundsAccess

pytestmark = pytest.mark.skipif(ON_GPU, reason="checks the CPU interpreter's memcheck; compute-sanitizer's on a GPU")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, shift, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if MASKED:
        tl.store(dst_ptr + offs + shift, tl.load(src_ptr + offs, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + offs + shift, tl.load(src_ptr + offs))


def test_in_bounds_accesses_pass(interpreter_memcheck):
    src, dst = torch.arange(5.0), torch.zeros(5)
    launches = interpreter_memcheck.num_launches
    _copy_kernel[(1,)](src, dst, 5, 0, BLOCK=8, MASKED=True)
    assert torch.equal(dst, src) and interpreter_memcheck.num_launches == launches + 1


@pytest.mark.parametrize("masked, shift, match", [
    (False, 0, r"_copy_kernel: out-of-bounds load of 3 elements, the first 0 elements past the end of 'src_ptr'"),
    (True, 1, r"out-of-bounds store of 1 elements, the first 0 elements past the end of 'dst_ptr'"),
    (True, -2, r"out-of-bounds store of 2 elements, the first 2 elements before 'dst_ptr'"),
])
def test_stray_accesses_fail_the_launch(masked, shift, match):
    buffer = torch.zeros(32)  # src and dst sit inside one buffer, apart: a stray access lands in real memory
    src, dst = buffer[2:7], buffer[20:25]
    with pytest.raises(triton.runtime.errors.InterpreterError, match=match) as error:
        _copy_kernel[(1,)](src, dst, 5, shift, BLOCK=8, MASKED=masked)
    assert isinstance(error.value.__cause__, OutOfBoundsAccess)
