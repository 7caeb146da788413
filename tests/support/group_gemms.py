"""A group's GEMM operands with a leading member axis, and a torch thread count for a block: shared by
tests/train/test_train_grouped_threads.py and benchmarks/batched_sums.py (and the formats' tests that
set threads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's thread count `count` inside the block, the one before after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def gemm_operands(members: int, rows: int, reduction: int, columns: int, a_transposed: bool,
                  b_transposed: bool, bias: bool, generator: torch.Generator,
                  device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """a (G, rows, reduction), b (G, reduction, columns), each transposed in memory where asked, and a
    bias (G, columns) where asked: normal random values from `generator`."""
    a = torch.randn(members, reduction, rows, generator=generator).transpose(1, 2) if a_transposed \
        else torch.randn(members, rows, reduction, generator=generator)
    b = torch.randn(members, columns, reduction, generator=generator).transpose(1, 2) if b_transposed \
        else torch.randn(members, reduction, columns, generator=generator)
    ops = (a, b, torch.randn(members, columns, generator=generator)) if bias else (a, b)
    return tuple(t.to(device) for t in ops)
