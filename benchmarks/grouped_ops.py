"""aten operations dispatched per training step: a run alone against a group of G (grouped training's
per-member overhead, counted rather than timed, so the machine's load does not matter).

    PYTHONPATH=$PWD python benchmarks/grouped_ops.py                      # digits MLP, G = 3 and 8
    PYTHONPATH=$PWD python benchmarks/grouped_ops.py --sizes 2,16 --formats fp32,mxfp4

A step is what `train` and `train_group` run per batch: forward, loss, backward, optimizer step,
zero_grad (batch 64, SGD with the config's defaults). The count is of the third step, after the
optimizer's first-step setup; `--rounding` applies to every quantized format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dse.data import load_dataset  # noqa: E402
from dse.models.proxies import build_model  # noqa: E402
from dse.train import TrainConfig  # noqa: E402
from dse.train.grouped import _quantized_setup  # noqa: E402
from dse.train.loop import EXAMPLE_SAMPLES, _run_settings, prepare  # noqa: E402


class _Counting(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(step: Any, warmup: int = 2) -> int:
    for _ in range(warmup):
        step()
    with _Counting() as counting:
        step()
    return counting.count


def count(config: TrainConfig, members: int) -> int:
    """aten operations of one step of `config` alone (members 0) or of a group of `members` seeds."""
    data = load_dataset(config.dataset)
    example = data.x_train[:EXAMPLE_SAMPLES]
    batch = torch.arange(config.batch_size)
    with _run_settings(1):
        if members == 0:
            torch.manual_seed(config.seed)
            model = build_model(config.model, data)
            setup = prepare(model, config, torch.Generator().manual_seed(0), example)
            setup.on_epoch_start(0)

            def alone() -> None:
                setup.loss_fn(setup.model(data.x_train[batch]), data.y_train[batch]).backward()
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
            return _ops_per_step(alone)
        configs = [config.replace(seed=g) for g in range(members)]
        models = []
        for member in configs:
            torch.manual_seed(member.seed)
            models.append(build_model(member.model, data))
        group = _quantized_setup(models, configs, [torch.Generator().manual_seed(g) for g in range(members)],
                                 example)
        group.on_epoch_start(0)
        index = batch.expand(members, -1)

        def grouped() -> None:
            group.member_losses(group.model(data.x_train[index]), data.y_train[index])[1].backward()
            group.step()
            group.zero_grad()
        return _ops_per_step(grouped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--formats", default="fp32,int8,fp8_e4m3")
    parser.add_argument("--rounding", default="stochastic")
    parser.add_argument("--sizes", default="3,8")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"| step | alone | {' | '.join(f'G = {size}' for size in sizes)} |")
    print(f"|---|---|{'---|' * len(sizes)}")
    for spec in args.formats.split(","):
        config = TrainConfig(model="mlp", dataset=args.dataset, epochs=1, batch_size=64, format=spec,
                             rounding="nearest" if spec == "fp32" else args.rounding)
        counts = [count(config, members) for members in [0, *sizes]]
        print(f"| {spec} | {' | '.join(str(c) for c in counts)} |")


if __name__ == "__main__":
    main()
