"""host_tensors: disjoint, aligned, writable views of one mapping that outlive the dict they came in."""

import gc
from itertools import pairwise

import torch

from hayabusa.engine.loading.host_arena import ALIGN_BYTES, host_tensors


def test_tensors_are_disjoint_aligned_views_of_one_buffer():
    specs = {"a": ((3, 5), torch.float32), "b": ((7,), torch.bfloat16), "c": ((2, 2, 3), torch.float16),
             "empty": ((0, 4), torch.float32)}
    tensors = host_tensors(specs)
    spans = []
    for name, (shape, dtype) in specs.items():
        tensor = tensors[name]
        assert tuple(tensor.shape) == shape and tensor.dtype == dtype and tensor.is_contiguous(), name
        assert tensor.data_ptr() % ALIGN_BYTES == 0, name
        spans.append((tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * dtype.itemsize))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))
    for index, tensor in enumerate(tensors.values()):  # writing one never touches another
        tensor.fill_(index + 1)
    assert [t.unique().tolist() for t in tensors.values() if t.numel()] == [[1.0], [2.0], [3.0]]


def test_a_view_keeps_the_mapping_alive():
    tensors = host_tensors({"kept": ((1024,), torch.float32), "dropped": ((1 << 20,), torch.float32)})
    kept = tensors["kept"].copy_(torch.arange(1024.0))
    del tensors
    gc.collect()
    host_tensors({"other": ((1 << 20,), torch.float32)})["other"].fill_(-1.0)  # reuses freed memory, if any
    assert torch.equal(kept, torch.arange(1024.0))
