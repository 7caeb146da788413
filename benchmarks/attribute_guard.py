"""What a group's shared-state guard (`StackedModel._shared_state_guarded`: each forward takes the
Python attributes of the user's modules it runs once for all members, and compares them after) costs a
forward, today (dse/train/attributes.py) against the guard's take and compare as they were at a git
revision (that revision's dse/train/attributes.py `Attributes`, loaded from its source), side by side in
one process, interleaved, one thread, thread CPU time.

    PYTHONPATH=$PWD python benchmarks/attribute_guard.py
    PYTHONPATH=$PWD python benchmarks/attribute_guard.py --baseline 80ed936 --rounds 9 --forwards 100

Per model (stacked, G=3, B=50, training mode): microseconds of thread CPU time spent in the guard's
own code (its take before, its compare after) inside real training forwards that write nothing new
(the median of the rounds, each the mean of `--forwards` forwards), the same clock around no guard
(what the timer itself costs, in both columns), and one training forward of the group, for scale.
`tests/support/user_models.py:encoder` holds dse's own functional-GEMM object as an attribute;
`leaf_models.py:counted_steps` writes an int every forward; `leaf_models.py:cyclic_counter` counts its
forwards in a helper object and a dict that hold themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train.layers import QuantSwitch
from dse.train.stacked import SharedStateGuard, StackedModel, stack_models

MODELS = ("tests/support/user_models.py:encoder", "tests/support/leaf_models.py:counted_steps",
          "tests/support/leaf_models.py:cyclic_counter")


def _source(revision: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def baseline_rule(revision: str) -> types.ModuleType:
    """dse/train/attributes.py as it was at `revision` (its `Attributes`: the guard's take and compare),
    executed apart."""
    module = types.ModuleType("baseline_attributes")
    exec(compile(_source(revision, "dse/train/attributes.py"), "baseline_attributes", "exec"), vars(module))
    return module


def baseline_guard(model: StackedModel, rule: types.ModuleType
                   ) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """The guard's take and compare by the baseline's `Attributes`, on `model`'s shared modules and the
    names its first forward wrote."""
    guard: SharedStateGuard = model.__dict__["shared_state"]
    modules, first = guard.modules, guard.first_written
    assert first is not None

    @contextlib.contextmanager
    def guarded() -> Iterator[None]:
        before = [rule.Attributes(m) for _, m in modules]
        yield
        written = [set(kept.changed()) for kept in before]
        if any(now - then for now, then in zip(written, first, strict=True)):
            raise AssertionError("a forward wrote a new attribute")

    return guarded


class _GuardClock:
    """Thread CPU time spent in a guard's code (its take before the forward, its compare after),
    inside real forwards: caches as a forward leaves them, where a guard timed alone in a loop finds
    everything hot (4.3 us a guard on encoder so timed, 16 us inside its forwards)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def around(self, guard: Callable[[], contextlib.AbstractContextManager[None]]
               ) -> Callable[[StackedModel], contextlib.AbstractContextManager[None]]:
        @contextlib.contextmanager
        def timed(model: StackedModel) -> Iterator[None]:
            held = guard()
            start = time.thread_time()
            held.__enter__()
            self.seconds += time.thread_time() - start
            yield
            start = time.thread_time()
            held.__exit__(None, None, None)
            self.seconds += time.thread_time() - start

        return timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="80ed936", help="git revision of the guard to compare with")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--forwards", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rule = baseline_rule(args.baseline)
    data = load_dataset("digits")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min), baseline {args.baseline}, one thread")
    print("| model | guard before (us) | guard now (us) | now / before | timer alone (us) "
          "| one forward (us) |")
    print("|---|---|---|---|---|---|")
    guard_now = StackedModel._shared_state_guarded
    for spec in MODELS:
        torch.manual_seed(0)
        path, _, name = spec.rpartition(":")
        members = [build_model(f"{Path(path).resolve()}:{name}", data) for _ in range(3)]
        x = data.x_train[:150].reshape(3, 50, *data.x_train.shape[1:])
        model = stack_models(members, None, QuantSwitch(), None, x[0])
        model.train()
        model(x)  # (the first forward: the names it writes)
        guards: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
            "before": baseline_guard(model, rule), "now": functools.partial(guard_now, model),
            "timer": contextlib.nullcontext}
        rounds: dict[str, list[float]] = {k: [] for k in (*guards, "forward")}
        try:
            for _ in range(args.rounds):
                for kind, guard in guards.items():
                    clock = _GuardClock()
                    StackedModel._shared_state_guarded = clock.around(guard)  # type: ignore[method-assign, assignment]
                    start = time.thread_time()
                    for _ in range(args.forwards):
                        model(x)
                    rounds["forward"].append((time.thread_time() - start) / args.forwards * 1e6)
                    rounds[kind].append(clock.seconds / args.forwards * 1e6)
        finally:
            StackedModel._shared_state_guarded = guard_now  # type: ignore[method-assign]
        old, new, timer, forward = (statistics.median(rounds[k])
                                    for k in ("before", "now", "timer", "forward"))
        print(f"| {name} | {old:.1f} | {new:.1f} | {new / old:.2f}x | {timer:.1f} | {forward:.0f} |")


if __name__ == "__main__":
    main()
