"""The grouped step's per-call costs that do not shrink with the group, each against its former code,
interleaved in one process (thread CPU µs, best of --rounds x --calls, one thread).

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_hot_path.py
    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_hot_path.py --sizes 3 --rounds 7

- *10-column Linear backward*: `StackedLinearOp.backward` of the quickstart MLP's last layer (100 rows,
  256 -> 10: a member's (100, 10) gradient block is 4000 bytes, off a 64-byte boundary), which copies
  the errors to alone's alignment once for both GEMMs, against copying them for each GEMM (before).
- *quantize_members*: a group's per-tensor-scaled quantize of a (G, 100, 256) activation, each
  member's scale, range check and within-max taken in one pass and the rounding's name checked
  without a parse, against the former per-member passes and parse (before); and a run's own
  `quantize` alone, which shares only the check.

The baselines are the former functions, patched in for their turn; the bits are the same either way
(tests/train/test_train_grouped_overhead.py, tests/formats).

--step-ablations: where a group step's Python goes, by ablation (nothing here keeps each member's bits;
a measure only). The quickstart's fp32 step (forward, loss, backward, SGD step, zero_grad) of a group
of G at a batch of --rows (4: its arithmetic small, so the step is Python and dispatch), CPU µs a group
step, interleaved in one process, best of 9 x 100 steps (in brackets what each saves and its ratio to
the first): as the group trains; without the GEMM decisions (`aligned_sums_as_members` answering
batched at once: no key, no copy to alone's alignment);
without the shared-state guard of a user's modules (a built-in proxy has none); the loss without each
member's own value (the objective alone); and the same network grouped by hand in plain torch
(benchmarks/grouped_gap.py's `by_hand`: one baddbmm a layer, torch's SGD over the stacked weights).

--optimizer-runs: the optimizer step of a group whose members differ in their learning rate (the tuned
sweep's: --lrs rates x G / --lrs seeds, runs of equal ones), as it steps now (one torch optimizer, a
param group a run, `foreach`) against the former one optimizer a run (torch's per-tensor loop, as
`dse train` steps alone), on the same gradients, CPU µs a step, interleaved, best of --rounds x 20.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import functools
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dse.formats.base as base  # noqa: E402
import dse.formats.block as block  # noqa: E402
import dse.formats.fast.floating as fast_floating  # noqa: E402
import dse.formats.fast.scales as fast_scales  # noqa: E402
import dse.formats.fixed as fixed  # noqa: E402
import dse.formats.lns as lns  # noqa: E402
from dse.formats import get  # noqa: E402
from dse.train.stacked import StackedLinearOp, _rows, _unrows, member_gemm  # noqa: E402


def _backward_before(self: StackedLinearOp, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                     need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    errors = _rows(dy)
    dx = _unrows(member_gemm(errors, weight), x, x.shape[-1]) if need_data else None
    dw = member_gemm(errors.transpose(1, 2), _rows(x)) if need_weight else None
    return dx, dw


def _scales_before(fmt: Any, x: Tensor, low: Tensor, high: Tensor, shape: list[int], rounding: str,
                   generator: torch.Generator | None) -> Tensor | None:
    if not fast_scales.host_shortcuts(x.device) or not fast_scales.enabled(fast_scales.HOST_SCALE):
        return None
    amaxes = [max(-lo, hi) for lo, hi in zip(low.tolist(), high.tolist(), strict=True)]
    scales = [fast_scales.host_scale_of_amax(fmt, amax, x.dtype) for amax in amaxes]
    if x.dtype == torch.float32 and not all(base.FLOAT32_MIN_NORMAL <= s < base.FLOAT32_SCALE_LIMIT
                                            for s in scales):
        return None
    if all(scale == 1.0 for scale in scales):
        return fmt.round_unscaled(x, rounding, generator)
    scale_t = torch.frombuffer(array.array(fast_scales._ARRAY_TYPECODE[x.dtype], scales),
                               dtype=x.dtype).view(shape)
    within_max = all(fast_scales.quotients_within_max(fmt, amax, scale, x.dtype)
                     for amax, scale in zip(amaxes, scales, strict=True))
    return fmt.round_scaled(x, scale_t, rounding, generator, within_max)


def _check_before(rounding: str) -> str:
    canonical = re.sub(r"\s+", "", rounding).lower() if isinstance(rounding, str) else rounding
    base.parse_rounding(canonical)
    return canonical


_CHECK_USERS = (base, block, fast_floating, fixed, lns)
"""The modules that call `check_rounding` by the name they imported."""


@contextlib.contextmanager
def before() -> Iterator[None]:
    """The former code in place of today's."""
    saved = (StackedLinearOp.backward, fast_scales.quantize_members_per_tensor, base.check_rounding)
    StackedLinearOp.backward = _backward_before  # type: ignore[method-assign]
    fast_scales.quantize_members_per_tensor = _scales_before
    for module in _CHECK_USERS:
        module.check_rounding = _check_before  # type: ignore[attr-defined]
    try:
        yield
    finally:
        StackedLinearOp.backward, fast_scales.quantize_members_per_tensor = saved[:2]  # type: ignore[method-assign]
        for module in _CHECK_USERS:
            module.check_rounding = saved[2]  # type: ignore[attr-defined]


def _best_us(call: Callable[[], object], calls: int) -> float:
    started = time.thread_time_ns()
    for _ in range(calls):
        call()
    return (time.thread_time_ns() - started) / calls / 1e3


def compare(name: str, call: Callable[[], object], calls: int, rounds: int) -> None:
    """One row: `call` before and today, interleaved round by round."""
    with before():
        call()
    call()
    fastest = {"before": float("inf"), "today": float("inf")}
    for _ in range(rounds):
        with before():
            fastest["before"] = min(fastest["before"], _best_us(call, calls))
        fastest["today"] = min(fastest["today"], _best_us(call, calls))
    print(f"| {name} | {fastest['before']:.1f} | {fastest['today']:.1f} | "
          f"{fastest['before'] - fastest['today']:.1f} |")


def step_ablations(sizes: list[int], rows: int) -> None:
    """The Python of a group step, part by part (module docstring, --step-ablations)."""
    import dataclasses

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grouped import phase_steps
    from grouped_bound import _run, quickstart_configs
    from grouped_gap import by_hand

    import dse.train.stacked as stacked
    from dse.data import load_dataset

    @contextlib.contextmanager
    def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, saved)

    @contextlib.contextmanager
    def unguarded(_: Any) -> Iterator[None]:
        yield

    config = quickstart_configs()["fp32"].replace(batch_size=rows)
    data = load_dataset(config.dataset)
    print(f"CPU µs a group step of the quickstart's fp32 MLP at {rows} rows, best of 9 x 100 steps; load "
          f"average {os.getloadavg()[0]:.2f}")
    for members in sizes:
        steps = phase_steps(config, members, data)
        targets = data.y_train[:rows].expand(members, -1)

        def objective(logits: Tensor, count: int = members, targets: Tensor = targets) -> Tensor:
            rows_out = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
            return F.nll_loss(rows_out, targets.reshape(-1)) * count

        ways: dict[str, tuple[list[Any], Callable[[], contextlib.AbstractContextManager[None]]]] = {
            "as the group trains": (steps, contextlib.nullcontext),
            "no GEMM decisions": (steps, lambda: patched(stacked, "aligned_sums_as_members",
                                                         lambda *args, **_: (True, tuple(args[3])))),
            "no shared-state guard": (steps, lambda: patched(stacked.StackedModel, "_shared_state_guarded",
                                                             unguarded)),
            "no member loss values": ([steps[0], objective, *steps[2:]], contextlib.nullcontext),
            "by hand in plain torch": (by_hand(members, dataclasses.replace(
                data, x_train=data.x_train[:rows], y_train=data.y_train[:rows]), config.momentum or 0.0),
                contextlib.nullcontext)}
        for run_steps, context in ways.values():
            with context():
                _run(run_steps, 20)
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(9):  # interleaved: the load hits each alike
            for name, (run_steps, context) in ways.items():
                with context():
                    best[name] = min(best[name], _best_us(functools.partial(_run, run_steps, 1), 100))
        base = best["as the group trains"]
        print(f"G = {members}: " + "; ".join(f"{name} {us:.0f} ({base - us:+.0f}, {us / base:.2f}x)"
                                             for name, us in best.items()))


def optimizer_runs(sizes: list[int], rates: int, rounds: int) -> None:
    """A group's optimizer step, its runs in one foreach optimizer against one optimizer a run (module
    docstring, --optimizer-runs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grouped_bound import quickstart_configs

    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.train.allocator import keep_freed_memory
    from dse.train.grouped import _quantized_setup
    from dse.train.loop import EXAMPLE_SAMPLES
    from dse.train.optim import plain_optimizer

    keep_freed_memory()
    config = quickstart_configs()["fp32"]
    data = load_dataset(config.dataset)
    print(f"CPU µs an optimizer step of the quickstart's MLP (SGD, momentum {config.momentum}), {rates} "
          f"learning rates, best of {rounds} x 20; load average {os.getloadavg()[0]:.2f}")
    for members in sizes:
        seeds = max(1, members // rates)
        configs = [config.replace(seed=g % seeds, lr=0.025 * 2 ** (g // seeds)) for g in range(members)]
        grads: list[Tensor] = []
        steps: dict[str, Callable[[], None]] = {}
        for way in ("one optimizer a run (before)", "one foreach optimizer (today)"):
            models = []
            for member in configs:
                torch.manual_seed(member.seed)
                models.append(build_model(member.model, data))
            generators = [torch.Generator().manual_seed(c.seed) for c in configs]
            setup = _quantized_setup(models, configs, generators, data.x_train[:EXAMPLE_SAMPLES])
            stacked = setup.step.__self__
            if way.endswith("(before)"):
                stacked.runs = [(start, stop, plain_optimizer("sgd", views, group["lr"], config.momentum,
                                                              config.weight_decay), views)
                                for (start, stop, _, views), group in zip(
                                    stacked.runs, stacked.optimizers[0].param_groups, strict=True)]
                stacked.optimizers = [run[2] for run in stacked.runs]
            params = list(setup.model.parameters())
            grads = grads or [torch.randn(p.shape) for p in params]

            def step(params: list[Tensor] = params, setup: Any = setup, grads: list[Tensor] = grads) -> None:
                for p, grad in zip(params, grads, strict=True):
                    p.grad = grad
                setup.step()
                setup.zero_grad()
            steps[way] = step
        for step in steps.values():
            step()
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(rounds):  # interleaved: the load hits each alike
            for name, step in steps.items():
                best[name] = min(best[name], _best_us(step, 20))
        before, today = best.values()
        runs = -(-members // seeds)
        print(f"G = {members} ({runs} runs): " + "; ".join(f"{name} {us:.0f}" for name, us in best.items())
              + f" ({before - today:+.0f}, {today / before:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,12", help="group sizes (default 3,12)")
    parser.add_argument("--formats", default="int8,int4,fp8_e4m3,posit8,lns8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--step-ablations", action="store_true", help="only the group step's ablations")
    parser.add_argument("--rows", type=int, default=4, help="a member's batch in --step-ablations")
    parser.add_argument("--optimizer-runs", action="store_true", help="only the optimizer's runs")
    parser.add_argument("--lrs", type=int, default=4, help="learning rates in --optimizer-runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.optimizer_runs:
        optimizer_runs(sizes, args.lrs, args.rounds)
        return
    if args.step_ablations:
        from dse.train.allocator import keep_freed_memory

        keep_freed_memory()
        step_ablations(sizes, args.rows)
        return
    print(f"thread CPU µs a call, best of {args.rounds} x {args.calls}, one thread; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| call | before | today | saved |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for members in sizes:
        dy = torch.randn(members, 100, 10, generator=generator)
        x = torch.randn(members, 100, 256, generator=generator)
        weight = torch.randn(members, 10, 256, generator=generator)
        compare(f"10-column Linear backward, G = {members}",
                functools.partial(StackedLinearOp().backward, dy, x, weight, True, True), args.calls,
                args.rounds)
    for spec in args.formats.split(","):
        fmt = get(spec)
        for members in sizes:
            stacked = torch.randn(members, 100, 256, generator=generator)
            compare(f"{spec} quantize_members, G = {members}",
                    functools.partial(fmt.quantize_members, stacked, "nearest"), args.calls, args.rounds)
        alone = torch.randn(100, 256, generator=generator)
        compare(f"{spec} quantize alone", functools.partial(fmt.quantize, alone, "nearest"), args.calls,
                args.rounds)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
