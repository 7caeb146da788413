"""What `MemberKernelMode` costs a stacked group's training step, side by side in one process: each
network's step (forward, backward, an SGD step) with no mode, with the mode over the whole forward
(the earlier design: every torch call of the forward, quantizers included, through its Python
handler) and with `MemberKernels` (the mode on top, taken off inside our own layers). Prints the
median step time of each and the ratios to no mode.

    python benchmarks/member_mode.py                       # G = 4, batch 64, 1 thread
    python benchmarks/member_mode.py --repeat 7 --steps 20 --skip transformer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

USER_MODELS = Path(__file__).resolve().parent.parent / "tests" / "support" / "user_models.py"

CASES = [("mlp", "digits", "int8"), ("transformer", "sort", "int8"),
         (f"{USER_MODELS}:encoder", "digits", "int8"),
         (f"{USER_MODELS}:gated", "digits", "int8"), (f"{USER_MODELS}:gated", "digits", "fp32")]
"""The quickstart's int8 MLP and the sort transformer (which call none of the functions, forced under
the mode here), a user's nn.TransformerEncoderLayer and a user's network with SiLU and sigmoid."""
VARIANTS = ("none", "whole", "hooks")


def _step_timer(model: str, dataset: str, spec: str, members: int, batch: int, variant: str
                ) -> Callable[[int], float]:
    from dse.data import load_dataset
    from dse.formats.base import MemberGenerators
    from dse.models.proxies import build_model
    from dse.train.config import TrainConfig
    from dse.train.grouped import _cross_entropies
    from dse.train.layers import QuantSwitch
    from dse.train.member_kernels import MemberKernelMode, MemberKernels
    from dse.train.policy import QuantPolicy
    from dse.train.stacked import StackedGemmLayer, StackedMatmul, stack_models

    data = load_dataset(dataset)
    torch.manual_seed(0)
    nets = [build_model(model, data) for _ in range(members)]
    policy = QuantPolicy.from_config(TrainConfig(model=model, dataset=dataset, format=spec))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    stacked = stack_models(nets, policy, QuantSwitch(), generators, data.x_train[:4])
    if stacked.member_kernels is not None:
        stacked.member_kernels.remove()
    if variant == "hooks":
        stacked.member_kernels = MemberKernels(stacked.net, members, (StackedGemmLayer, StackedMatmul))
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.01)
    x = data.x_train[:members * batch].reshape(members, batch, *data.x_train.shape[1:])
    y = data.y_train[:members * batch].reshape(members, batch, *data.y_train.shape[1:])

    def step() -> None:
        if variant == "whole":
            with MemberKernelMode(members, batch):
                logits = stacked(x)
        else:
            logits = stacked(x)
        _, objective = _cross_entropies(logits, y)
        objective.backward()
        optimizer.step()
        optimizer.zero_grad()

    def timed(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    timed(3)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="networks to leave out, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} thread(s), G={args.members}, batch {args.batch}, "
          f"median of {args.repeat} x {args.steps} steps; load average {load}")
    print(f"{'network':34} {'no mode ms':>10} {'whole ms':>9} {'hooks ms':>9} {'whole/none':>10} "
          f"{'hooks/none':>10}")
    for model, dataset, spec in CASES:
        if Path(model).name.split(":")[-1] in args.skip.split(","):
            continue
        timers = {v: _step_timer(model, dataset, spec, args.members, args.batch, v) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in timers}
        for _ in range(args.repeat):
            for variant, timer in timers.items():  # interleaved, so load changes hit all three
                times[variant].append(timer(args.steps))
        ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        name = f"{Path(model).name if ':' in model else model} {spec}"
        print(f"{name:34} {ms['none']:10.2f} {ms['whole']:9.2f} {ms['hooks']:9.2f} "
              f"{ms['whole'] / ms['none']:10.2f} {ms['hooks'] / ms['none']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
