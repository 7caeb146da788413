"""benchmarks/grouped.py --sum-order-before times a group as it ran before its GEMMs were probed: every
entry to the decision (`sums_as_members`, and `aligned_sums_as_members`, which member_gemm and a
functional matmul call) answers by the rule alone inside it, still at each member's alignment alone,
and each is restored after it."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch
from support.benchmark_scripts import load_benchmark
from support.group_gemms import torch_threads

from dse.train import batched_sums, layers, stacked


@pytest.fixture(scope="module")
def grouped() -> ModuleType:
    return load_benchmark("grouped")


def test_sum_order_before_probes_no_gemm_and_restores_every_decision(
        grouped: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[int] = []
    probe = batched_sums._probe

    def counted(*args: Any) -> bool:
        probes.append(1)
        return probe(*args)

    monkeypatch.setattr(batched_sums, "_DECIDED", {})
    monkeypatch.setattr(batched_sums, "_probe", counted)
    entries = (stacked.sums_as_members, stacked.aligned_sums_as_members, layers.aligned_sums_as_members)
    x, w = torch.randn(3, 50, 37), torch.randn(3, 37, 16)  # x's members 7400 bytes apart: copied
    with grouped.sum_order_before(), torch_threads(1):  # (the rule alone is one thread's)
        together = stacked.member_gemm(x, w)
        product = layers._product(x, w, layers.MemberRanks(3, 3, True))
    assert probes == []
    for g in range(3):  # at alone's alignment still: each member's own product on fresh operands
        alone = x[g].clone() @ w[g].clone()
        assert torch.equal(together[g].view(torch.int32), alone.view(torch.int32))
        assert torch.equal(product[g].view(torch.int32), alone.view(torch.int32))
    assert entries == (stacked.sums_as_members, stacked.aligned_sums_as_members,
                       layers.aligned_sums_as_members)
    stacked.member_gemm(x, w)
    assert probes == [1]
