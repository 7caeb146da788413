"""A pytest plugin that runs every CPU GEMM with its operands at 64-byte boundaries: does a test that
compares a group with alone fail only because a GEMM's bits depend on its operands' addresses?

    PYTHONPATH=$PWD:benchmarks python -m pytest -p aligned_gemms tests/train/test_member_kernels.py

An mm / addmm takes fresh copies of its operands (torch's CPU allocator aligns a fresh tensor to 64
bytes); a bmm / baddbmm stays one batched call on copies whose batch entries each start at a 64-byte
boundary. Alone and in a group alike: a test that fails without it and passes with it fails for the
GEMMs' addresses (on session 13's AMD EPYC, MKL's sgemm sums an operand off a 16-byte boundary
otherwise), not for anything the group computes differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALIGNMENT_BYTES = 64

_aten = torch.ops.aten


def _fresh(operand: Any) -> Any:
    return operand.clone() if isinstance(operand, torch.Tensor) else operand


def _entries_aligned(batched: torch.Tensor) -> torch.Tensor:
    """`batched` (entries on its first axis) copied so that each entry, dense in its own layout,
    starts at an ALIGNMENT_BYTES boundary."""
    entry = batched[0].clone()
    align = ALIGNMENT_BYTES // batched.element_size()
    step = -(-entry.numel() // align) * align
    storage = torch.empty(batched.shape[0] * step + align, dtype=batched.dtype)
    shift = (-storage.data_ptr() % ALIGNMENT_BYTES) // batched.element_size()
    return storage.as_strided(batched.shape, (step, *entry.stride()), shift).copy_(batched)


class AlignedGemms(TorchDispatchMode):
    """Every CPU mm / addmm on fresh operands, every bmm / baddbmm on entry-aligned ones."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        on_cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
        if on_cpu and func in (_aten.mm.default, _aten.addmm.default):
            return func(*[_fresh(a) for a in args], **kwargs)
        if on_cpu and func is _aten.bmm.default:
            return func(_entries_aligned(args[0]), _entries_aligned(args[1]))
        if on_cpu and func is _aten.baddbmm.default:
            return func(args[0], _entries_aligned(args[1]), _entries_aligned(args[2]), **kwargs)
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _aligned_gemms() -> Iterator[None]:
    with AlignedGemms():
        yield
