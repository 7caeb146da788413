"""What `MemberKernelMode`'s read recording costs a stacked group's training step, side by side in one
process: each user network's step (forward, backward, an SGD step) under the mode as it records reads
now (every call's tensors checked against the forward's constants, `MemberKernelMode.constants`) and
under the same mode with the earlier rule (a read of a floating-point or bool tensor's values only,
nothing else kept), interleaved, thread CPU time, median step of the rounds. Users' networks that
stay grouped: their forwards read nothing into Python, so both give the same result and only the cost
differs.

    PYTHONPATH=$PWD python benchmarks/value_reads.py
    PYTHONPATH=$PWD python benchmarks/value_reads.py --rounds 9 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dse.data import load_dataset
from dse.formats.base import MemberGenerators
from dse.models.proxies import build_model
from dse.train.config import TrainConfig
from dse.train.grouped import _cross_entropies
from dse.train.layers import QuantSwitch
from dse.train.member_kernels import MemberKernelMode
from dse.train.policy import QuantPolicy
from dse.train.stacked import StackedModel, stack_models

SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support"
CASES = [(f"{SUPPORT}/user_models.py:encoder", "int8"), (f"{SUPPORT}/user_models.py:gated", "int8"),
         (f"{SUPPORT}/user_models.py:gated", "fp32"),
         (f"{SUPPORT}/leaf_models.py:batch_inner_statistics", "fp32"),
         (f"{SUPPORT}/leaf_models.py:cyclic_counter", "fp32")]
"""A user's nn.TransformerEncoderLayer (many torch calls under the mode), a user's SiLU-and-sigmoid
network, one taking statistics over a batch-innermost view (calls the mode runs member by member), and
one counting its forwards in Python attributes."""

EARLIER_READS = frozenset({
    Tensor.item, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.__complex__, Tensor.tolist,
    Tensor.numpy, Tensor.__format__, Tensor.__array__, Tensor.__bool__,
})


class EarlierReads(MemberKernelMode):
    """The member mode with the earlier read rule: the first of EARLIER_READS of a floating-point or
    bool tensor, no constants kept."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if (func in EARLIER_READS and self.read is None and args and isinstance(args[0], Tensor)
                and (args[0].is_floating_point() or args[0].dtype == torch.bool)):
            self.read = torch.overrides.resolve_name(func) or repr(func)
        return self._followed(func, args, kwargs, self._call(func, args, kwargs))


EarlierReads.__module__ = MemberKernelMode.__module__  # (taken off inside dse's layers as the mode is:
# `MemberKernels` tells dse's modes by the module that defines them)


def _group(model: str, spec: str, members: int, batch: int) -> tuple[StackedModel, Callable[[], None]]:
    data = load_dataset("digits")
    torch.manual_seed(0)
    nets = [build_model(model, data) for _ in range(members)]
    policy = QuantPolicy.from_config(TrainConfig(model=model, dataset="digits", format=spec))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    stacked = stack_models(nets, policy, QuantSwitch(), generators, data.x_train[:4])
    assert stacked.member_kernels is not None
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.01)
    x = data.x_train[:members * batch].reshape(members, batch, *data.x_train.shape[1:])
    y = data.y_train[:members * batch].reshape(members, batch)
    stacked.train()

    def step() -> None:
        _, objective = _cross_entropies(stacked(x), y)
        objective.backward()
        optimizer.step()
        optimizer.zero_grad()

    return stacked, step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, one thread, G={args.members}, batch {args.batch}, median of "
          f"{args.rounds} rounds of {args.steps} steps, thread CPU time; load average {load}")
    print("| network | earlier rule ms | now ms | now / earlier |")
    print("|---|---|---|---|")
    for model, spec in CASES:
        stacked, step = _group(model, spec, args.members, args.batch)
        kernels = stacked.member_kernels
        assert kernels is not None
        modes = {"earlier": EarlierReads(args.members), "now": MemberKernelMode(args.members)}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for mode in modes.values():
            kernels.mode = mode
            step()  # (warm: the probes and the first forward's names)
        for _ in range(args.rounds):
            for name, mode in modes.items():  # interleaved, so a load change hits both
                kernels.mode = mode
                start = time.thread_time()
                for _ in range(args.steps):
                    step()
                times[name].append((time.thread_time() - start) / args.steps * 1e3)
        for name, mode in modes.items():
            assert mode.read is None, (name, mode.read)  # (each network stays grouped under both)
        earlier, now = (statistics.median(times[name]) for name in modes)
        print(f"| {Path(model).name} {spec} | {earlier:.2f} | {now:.2f} | {now / earlier:.3f} |", flush=True)


if __name__ == "__main__":
    main()
