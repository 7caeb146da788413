"""What the functional-GEMM mode's look at every other call costs a group's training step: whether the
call writes a member tensor (or its `.data`) in place (`StackedFunctionalGemms.other_call`), and
whether it reads a member tensor's `.data` (`FunctionalGemms.note_data`), against both switched off
(the call as it is), side by side in one process, interleaved, one thread, thread CPU time.

    PYTHONPATH=$PWD python benchmarks/functional_writes.py
    PYTHONPATH=$PWD python benchmarks/functional_writes.py --rounds 9 --steps 50

Per model (stacked, G=3, B=50, fp32, training mode): microseconds of thread CPU time of one forward
and backward (the median of the rounds, each the mean of `--steps` steps) with the look and without,
and their ratio. `tests/support/user_models.py:encoder` and `:functional` call their GEMMs as
functions; `tests/support/own_networks.py:max_norm_linear` renorms its weight each forward (without
the look its write runs on the stacked weight: the time of a wrong result, for scale).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train.functional import FunctionalGemms
from dse.train.layers import QuantSwitch
from dse.train.stacked import stack_models
from dse.train.stacked_functional import StackedFunctionalGemms

MODELS = ("tests/support/user_models.py:encoder", "tests/support/user_models.py:functional",
          "tests/support/own_networks.py:max_norm_linear")


def _as_it_is(self: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func(*args, **kwargs)


def _nothing(self: Any, func: Any, args: tuple[Any, ...], result: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min), one thread")
    print("| model | step without the look (us) | step with it (us) | with / without |")
    print("|---|---|---|---|")
    looks = {"with": (StackedFunctionalGemms.other_call, FunctionalGemms.note_data),
             "without": (_as_it_is, _nothing)}
    for spec in MODELS:
        torch.manual_seed(0)
        path, _, name = spec.rpartition(":")
        members = [build_model(f"{Path(path).resolve()}:{name}", data) for _ in range(3)]
        x = data.x_train[:150].reshape(3, 50, *data.x_train.shape[1:])
        model = stack_models(members, None, QuantSwitch(), None, x[0])
        model.train()
        rounds: dict[str, list[float]] = {kind: [] for kind in looks}
        try:
            for _ in range(args.rounds):
                for kind, (other_call, note_data) in looks.items():
                    StackedFunctionalGemms.other_call = other_call  # type: ignore[method-assign]
                    FunctionalGemms.note_data = note_data  # type: ignore[method-assign]
                    start = time.thread_time()
                    for _ in range(args.steps):
                        model(x).sum().backward()
                    rounds[kind].append((time.thread_time() - start) / args.steps * 1e6)
        finally:
            StackedFunctionalGemms.other_call, FunctionalGemms.note_data = looks["with"]  # type: ignore[method-assign]
        without, with_look = (statistics.median(rounds[k]) for k in ("without", "with"))
        print(f"| {name} | {without:.0f} | {with_look:.0f} | {with_look / without:.3f}x |")


if __name__ == "__main__":
    main()
