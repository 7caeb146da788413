"""What a group's shared-state guard (`StackedModel._shared_state_guarded`: each forward takes the
Python attributes of the user's modules it runs once for all members, and compares them after) costs a
forward, today (dse/train/attributes.py) against the guard as it was at a git revision (its
`module_attributes`, `_attribute_written` and `_same_value`, loaded from that revision's source), side
by side in one process, interleaved, one thread, thread CPU time.

    PYTHONPATH=$PWD python benchmarks/attribute_guard.py
    PYTHONPATH=$PWD python benchmarks/attribute_guard.py --baseline 3d1e0dc --rounds 9 --forwards 100

Per model (stacked, G=3, B=50, training mode): microseconds of thread CPU time spent in the guard's
own code (its take before, its compare after) inside real training forwards that write nothing new
(the median of the rounds, each the mean of `--forwards` forwards), the same clock around no guard
(what the timer itself costs, in both columns), and one training forward of the group, for scale.
`tests/support/user_models.py:encoder` holds dse's own functional-GEMM object as an attribute;
`leaf_models.py:counted_steps` writes an int every forward.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import os
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train.layers import QuantSwitch
from dse.train.stacked import StackedModel, stack_models

MODELS = ("tests/support/user_models.py:encoder", "tests/support/leaf_models.py:counted_steps")


def _source(revision: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def baseline_rule(revision: str) -> types.SimpleNamespace:
    """The attribute functions the guard used at `revision`: memory.py's module_attributes and
    MODULE_INTERNALS (the whole module, executed apart), stacked.py's _attribute_written and
    _same_value (those two functions' source, executed beside them)."""
    memory: dict[str, Any] = {"__name__": "baseline_memory"}
    exec(compile(_source(revision, "dse/train/memory.py"), "baseline_memory", "exec"), memory)
    tree = ast.parse(_source(revision, "dse/train/stacked.py"))
    wanted: list[ast.stmt] = [node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in ("_attribute_written", "_same_value")]
    stacked: dict[str, Any] = {"__name__": "baseline_stacked", **memory}
    exec("import collections\nimport numpy as np\nfrom torch import Tensor", stacked)
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "baseline_stacked", "exec"), stacked)
    return types.SimpleNamespace(module_attributes=memory["module_attributes"],
                                 internals=memory["MODULE_INTERNALS"], written=stacked["_attribute_written"])


def baseline_guard(model: StackedModel, rule: types.SimpleNamespace
                   ) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """The guard as it was at the baseline revision, on `model`'s shared modules and first forward."""
    modules: list[tuple[str, nn.Module]] = model.__dict__["shared_modules"]
    first: list[set[str]] = model.__dict__["shared_written"]

    @contextlib.contextmanager
    def guarded() -> Iterator[None]:
        before = [rule.module_attributes(m) for _, m in modules]
        yield
        written = [{attribute for attribute, value in vars(m).items() if attribute not in rule.internals
                    and rule.written(value, kept.get(attribute))}
                   for (_, m), kept in zip(modules, before, strict=True)]
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
    parser.add_argument("--baseline", default="3d1e0dc", help="git revision of the guard to compare with")
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
