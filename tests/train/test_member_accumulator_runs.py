"""A stacked fold's runs of members (`MemberAccumulators`): each run of several members is batched
exactly where its own chunks sum as each member's GEMM (`bmm_sums_as_mm` of that run's chunk shapes,
one thread), the later runs included, and every member's result is its fold alone, bit for bit."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dse.formats import get
from dse.formats.base import MemberGenerators
from dse.train import accumulation, stacked
from dse.train.accumulation import Accumulator
from dse.train.batched_sums import bmm_sums_as_mm
from dse.train.policy import TensorQuant
from dse.train.stacked import MemberAccumulators, _accumulator

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMS = {"forward": (accumulation.matmul_forward, accumulation._matmul_partial),
         "backward-a": (accumulation.matmul_backward_a, accumulation._matmul_a_partial),
         "backward-b": (accumulation.matmul_backward_b, accumulation._matmul_b_partial)}


class GemmCalls(TorchDispatchMode):
    """The matrix products run inside: ("aten::mm", 1) or ("aten::bmm", batch), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"):
            self.calls.append((name, args[0].shape[0] if name.endswith("bmm") else 1))
        return func(*args, **(kwargs or {}))


def _operands(gemm: str, members: int, rows: int, reduction: int, columns: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMM's two stacked operands whose chunks are (rows, columns) products over `reduction`."""
    source = torch.Generator().manual_seed(seed)
    if gemm == "forward":  # a (rows, k) @ b (k, columns)
        shapes = [(members, rows, reduction), (members, reduction, columns)]
    elif gemm == "backward-a":  # dy (rows, m) @ b^T, b (columns, m)
        shapes = [(members, rows, reduction), (members, columns, reduction)]
    else:  # a^T (rows, n) @ dy (n, columns)
        shapes = [(members, reduction, rows), (members, reduction, columns)]
    first, second = (torch.randn(shape, generator=source) * 10 for shape in shapes)
    return first, second


@settings(max_examples=60, deadline=None)
@given(gemm=st.sampled_from(sorted(GEMMS)), members=st.integers(2, 6), rows=st.sampled_from([1, 2, 5, 12]),
       reduction=st.integers(1, 40), columns=st.sampled_from([1, 3, 8, 20]),
       chunk=st.sampled_from([1, 4, 16]), grain=st.sampled_from([2, 40, 100, 500, 2**62]),
       seed=st.integers(0, 2**16))
def test_each_run_of_members_is_batched_where_its_own_chunks_sum_as_each_members_gemm(
        gemm: str, members: int, rows: int, reduction: int, columns: int,
        chunk: int, grain: int, seed: int) -> None:
    """Runs cut by the grain (runs of one, of several with a shorter last one, the whole group): the
    decision of a run after the first is its own (the fold passes member 0's first chunk down, whose
    rows and columns every member's chunk shares); a run decided from another run's chunks would
    show here as a run batched where its chunks do not sum as its members' (or the other way). The
    GEMM calls are those the fold ran before runs and the whole group shared one loop, in order."""
    fold, partial = GEMMS[gemm]
    first, second = _operands(gemm, members, rows, reduction, columns, seed)
    quant = TensorQuant(get("fp16"))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    group = _accumulator(quant, chunk, generators)
    assert isinstance(group, MemberAccumulators)
    grain_before = stacked.PARALLEL_GRAIN
    stacked.PARALLEL_GRAIN = grain
    try:
        with GemmCalls() as seen:
            together = fold(first, second, group)
    finally:
        stacked.PARALLEL_GRAIN = grain_before

    chunks = [(start, min(start + chunk, reduction)) for start in range(0, reduction, chunk)]
    ahead = len(chunks) > 1  # member 0's first chunk, computed before the runs (their length from it)
    run = max(1, (grain - 1) // (rows * columns)) if ahead else members
    expected = [("aten::mm", 1)] if ahead else []
    for start in range(0, members, run):
        stop = min(start + run, members)
        own = [partial(first[start:stop], second[start:stop], a, b).shape for a, b in chunks]
        if stop - start > 1 and all(bmm_sums_as_mm(shape[-2], b - a, shape[-1])
                                    for shape, (a, b) in zip(own, chunks, strict=True)):
            expected += [("aten::bmm", stop - start)] * len(chunks)
        else:  # member by member, member 0 from its first chunk
            expected += [("aten::mm", 1)] * (len(chunks) * (stop - start) - (ahead and start == 0))
    assert seen.calls == expected
    alone = [fold(first[g], second[g], Accumulator(
        functools.partial(quant, generator=torch.Generator().manual_seed(g)), chunk)) for g in range(members)]
    assert torch.equal(together, torch.stack(alone))
