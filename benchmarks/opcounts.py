"""dse's operation counts beside torch's, per built-in full-size workload, one training step at batch 1:
forward and backward multiply-adds (torch.utils.flop_counter, its grouped-convolution backward corrected
as in tests/models/test_opcounts.py), parameters, and the work dse does not price: elements written by
every other aten op of the step (elementwise, normalisation, softmax, pooling, bias adds, reductions),
per multiply-add, from torch's own dispatch trace. The networks are tests/support/reference_networks.py's
torch modules on the meta device (shapes only, about 10 s in all).

    PYTHONPATH=. python benchmarks/opcounts.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.models.workloads import get_workload  # noqa: E402
from tests.models.test_opcounts import torch_training_macs  # noqa: E402
from tests.support.reference_networks import REFERENCES  # noqa: E402

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.convolution_backward}
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "transpose", "t", "permute", "slice", "select",
         "unsqueeze", "squeeze", "detach", "alias", "split", "chunk", "unbind", "as_strided", "clone",
         "empty_like", "zeros_like", "ones_like", "new_empty_strided", "empty", "zeros", "ones", "arange",
         "lift_fresh", "_to_copy", "copy_", "split_with_sizes", "contiguous", "fill_", "new_zeros", "full"}
"""Ops that move or allocate but compute nothing (a copy's bytes are memory traffic, not arithmetic)."""


class _Elements(TorchDispatchMode):
    """Elements written by each non-GEMM, non-view aten op (an elementwise op writes one per operation;
    a reduction or a normalisation writes fewer than it computes, so this is a floor)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.overloadpacket not in GEMMS and name.rstrip("_") not in VIEWS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.written[name] += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out


def main() -> None:
    print("| workload | forward MMAC (dse / torch) | backward MMAC (dse / torch) | parameters (dse / torch) "
          "| other elements written / MAC | largest other ops |")
    print("|---|---|---|---|---|---|")
    for name, (build, make_input) in REFERENCES.items():
        with torch.device("meta"):
            net = build()
        workload = get_workload(name)
        rows = workload.training_gemms(1)
        dse = {"forward": sum(r["macs"] for r in rows if r["pass"] == "forward"),
               "backward": sum(r["macs"] for r in rows if r["pass"] in ("backward_data", "backward_weight"))}
        counted = torch_training_macs(lambda: net(make_input(1)))  # noqa: B023 (called at once)
        elements = _Elements()
        with elements:
            net(make_input(1)).float().sum().backward()
        total = sum(counted.values())
        top = ", ".join(f"{op} {count / total:.3f}" for op, count in elements.written.most_common(3))
        params = sum(p.numel() for p in net.parameters())
        print(f"| {name} | {dse['forward'] / 1e6:,.1f} / {counted['forward'] / 1e6:,.1f} "
              f"| {dse['backward'] / 1e6:,.1f} / {counted['backward'] / 1e6:,.1f} "
              f"| {workload.params:,} / {params:,} | {sum(elements.written.values()) / total:.3f} | {top} |")


if __name__ == "__main__":
    main()
