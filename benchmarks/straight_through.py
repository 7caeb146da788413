"""The cost of the straight-through wrapper on training's path: the quantize-style entry points as
they are today (each checks whether autograd records its input, `dse.formats.base.straight_through`)
against the same methods unwrapped (before), side by side in one process.

Training never records a quantize call (QuantGemm quantizes inside its own autograd function, where
grad mode is off, and its backward quantizes gradients that do not require grad), so on its path the
wrapper is one check and a call; this measures what that check costs against the quantize itself,
over the quickstart MLP's tensors (40-256-256-10, batch 100: each layer's input and weight, the
gradients have these shapes), with inputs that require grad inside an autograd function's forward
(as a layer's activations are there) and gradients that do not.

    PYTHONPATH=$PWD python benchmarks/straight_through.py
    PYTHONPATH=$PWD python benchmarks/straight_through.py --formats int8,mxfp4 --roundings nearest --rounds 7

Prints CPU microseconds of one pass over the six tensors (`quantize`, and `quantize_along` over both
axes for block formats, as a layer's GEMMs call it), before / today and the ratio, best of the
rounds, one thread; both give the same bits (checked here). First, the wrapper's own cost in
nanoseconds per call: `quantize` of a 16-element tensor (fp32, a copy, and int8), where a call is
the cheapest it gets and the check's share the largest. Last, whole training steps of that MLP
(forward, backward, SGD update), whose weights must come out the same bits both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(100, 40), (256, 40), (100, 256), (256, 256), (100, 256), (10, 256)]


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Every format class's entry points without the straight-through wrapper (its __wrapped__)."""
    from dse.formats.base import NumberFormat

    saved: list[tuple[type, str, Any]] = []
    for cls in (NumberFormat, *_subclasses(NumberFormat)):
        for name, method in list(vars(cls).items()):
            if getattr(method, "__wrapped_straight_through__", False):
                saved.append((cls, name, method))
                setattr(cls, name, method.__wrapped__)
    try:
        yield
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8,fp8_e4m3,posit8,lns8,mxfp4,nvfp4")
    parser.add_argument("--roundings", default="nearest,stochastic")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    _dispatch_rows(args.rounds * 4)
    _mlp_rows(args.formats.split(","), args.roundings.split(","), args.rounds, args.calls)
    _step_rows(args.formats.split(","), args.rounds, args.steps)


def _dispatch_rows(rounds: int, calls: int = 2000) -> None:
    import torch

    from dse.formats import get

    print(f"CPU ns of one quantize call on 16 elements (best of {rounds} x {calls}, 1 thread)\n")
    print("| format | input | before ns | today ns | today - before ns |")
    print("|---|---|---|---|---|")
    for spec in ("fp32", "int8"):
        fmt = get(spec)
        for recorded in (True, False):
            tiny = torch.randn(16).requires_grad_(recorded)

            def quantize_tiny(_generator: torch.Generator, fmt: Any = fmt, tiny: torch.Tensor = tiny
                              ) -> list[torch.Tensor]:
                return [fmt.quantize(tiny)]

            best = _best_of(quantize_tiny, rounds, calls)
            print(f"| {spec} | {_label(recorded)} | {best['before'] * 1e9:.0f} | {best['today'] * 1e9:.0f} | "
                  f"{(best['today'] - best['before']) * 1e9:+.0f} |", flush=True)


def _mlp_rows(specs: list[str], roundings: list[str], rounds: int, calls: int) -> None:
    import torch

    from dse.formats import get

    print(f"\nCPU us of one pass over the MLP's six tensors (best of {rounds} x {calls}, 1 thread)\n")
    print("| format | rounding | input | before us | today us | today / before |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        fmt = get(spec)
        for rounding in roundings:
            for recorded in (True, False):
                sources = [torch.Generator().manual_seed(i) for i in range(len(SHAPES))]
                tensors = [torch.randn(shape, generator=source).requires_grad_(recorded)
                           for shape, source in zip(SHAPES, sources, strict=True)]

                def quantize_all(generator: torch.Generator, tensors: list[torch.Tensor] = tensors,
                                 fmt: Any = fmt, rounding: str = rounding) -> list[torch.Tensor]:
                    if fmt.scaling.kind == "block":  # as a layer's GEMMs quantize their operands
                        return [q for t in tensors
                                for q in fmt.quantize_along(t, [0, 1], rounding, generator)]
                    return [fmt.quantize(t, rounding, generator) for t in tensors]

                best = _best_of(quantize_all, rounds, calls)
                print(f"| {spec} | {rounding} | {_label(recorded)} | {best['before'] * 1e6:.1f} | "
                      f"{best['today'] * 1e6:.1f} | {best['today'] / best['before']:.3f} |", flush=True)


def _step_rows(specs: list[str], rounds: int, steps: int) -> None:
    """Whole training steps of the quickstart's MLP on MNIST-1D (batch 100, SGD, nearest), each
    variant with its own model from the same seed: after the same steps their weights must agree bit
    for bit (the wrapper changes no training result)."""
    import torch

    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.train import TrainConfig
    from dse.train.loop import prepare

    torch.set_flush_denormal(True)  # as training runs
    data = load_dataset("mnist1d")
    x, y = data.x_train, data.y_train
    print(f"\nCPU ms of one training step, MLP on MNIST-1D, batch 100 (best of {rounds} x {steps}, "
          "1 thread)\n")
    print("| format | before ms | today ms | today / before |")
    print("|---|---|---|---|")
    for spec in specs:
        config = TrainConfig(model="mlp", dataset="mnist1d", batch_size=100, format=spec)
        runs = {}
        for name in ("before", "today"):
            torch.manual_seed(0)
            setup = prepare(build_model("mlp", data), config, torch.Generator().manual_seed(0), x[:2])
            runs[name] = (setup, torch.Generator().manual_seed(1))

        def step(name: str, runs: dict[str, Any] = runs) -> None:
            setup, order = runs[name]
            index = torch.randint(0, len(x), (100,), generator=order)
            setup.loss_fn(setup.model(x[index]), y[index]).backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)

        best = {"before": float("inf"), "today": float("inf")}
        for _ in range(rounds):
            for name in best:
                with unwrapped() if name == "before" else contextlib.nullcontext():
                    started = time.process_time()
                    for _ in range(steps):
                        step(name)
                    best[name] = min(best[name], (time.process_time() - started) / steps)
        weights = [[p.detach() for p in runs[name][0].model.parameters()] for name in ("before", "today")]
        assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
        print(f"| {spec} | {best['before'] * 1e3:.2f} | {best['today'] * 1e3:.2f} | "
              f"{best['today'] / best['before']:.3f} |", flush=True)


def _label(recorded: bool) -> str:
    return "requires grad, grad mode off" if recorded else "no grad"


def _best_of(quantize: Callable[[Any], list[Any]], rounds: int, calls: int) -> dict[str, float]:
    """Seconds per call, before and today alternately, best of `rounds`, in no-grad mode (as inside
    training's autograd functions); the outputs of both are checked bit for bit."""
    import torch

    best = {"before": float("inf"), "today": float("inf")}
    for _ in range(rounds):
        outputs = {}
        for name in best:
            with unwrapped() if name == "before" else contextlib.nullcontext(), torch.no_grad():
                outputs[name] = quantize(torch.Generator().manual_seed(0))  # (warm)
                best[name] = min(best[name], _timed(quantize, calls))
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                   for a, b in zip(outputs["before"], outputs["today"], strict=True))
    return best


def _timed(quantize_all: Callable[[Any], list[Any]], calls: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(1)
    started = time.process_time()
    for _ in range(calls):
        quantize_all(generator)
    return (time.process_time() - started) / calls


if __name__ == "__main__":
    main()
