"""What `state_kept` (dse/train/memory.py) costs: the look-ahead forwards that find a model's functional
GEMMs (`find_gemms`, every trial) and estimate its memory (`activation_bytes_per_sample`, every group)
with the model's parameters and buffers copied before and restored after, against the same forwards
with nothing copied, side by side in one process, one thread.

    PYTHONPATH=$PWD python benchmarks/state_kept.py
    PYTHONPATH=$PWD python benchmarks/state_kept.py --rounds 15 --steps 4

Per model: the bytes copied (its parameters and buffers), CPU milliseconds of the two forwards with
the copies and without, median of the rounds, interleaved, and their difference against one training
step at batch 64 (int8, Adam: what a trial takes tens to thousands of); then the peak CPU memory
torch held (its profiler) through a look-ahead and through a whole trial (`train`, one epoch of 256
samples), and the trial's planned memory (`trial_memory_bytes`), with the copies and without. The
built-in proxies on the largest datasets that need no download, and `wide_mlp` (784-4096-4096-10,
76.4 MiB of weights) as a large user's model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dse.data import Dataset, load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig, functional, memory, train

WORKLOADS = (("resnet", "mnist5k"), ("transformer", "sort"), ("cnn", "mnist5k"), ("mlp", "mnist5k"),
             ("benchmarks/state_kept.py:wide_mlp", "mnist5k"))


def wide_mlp(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A user's model far larger than the proxies (76.4 MiB of fp32 weights)."""
    inputs = 1
    for size in shape:
        inputs *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, classes))


@contextlib.contextmanager
def _nothing_kept(model: nn.Module) -> Iterator[None]:
    yield


KEPT = memory.state_kept


def _copies(kept: bool) -> None:
    """The look-ahead forwards with `state_kept`'s copies (today) or without."""
    functional.state_kept = memory.state_kept = KEPT if kept else _nothing_kept


def _cpu_ms(run: Callable[[], object], repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        run()
    return (time.process_time() - start) / repeats * 1e3


def peak_bytes(run: Callable[[], object]) -> int:
    """The most CPU memory torch held at once while `run` ran (the profiler's allocations and frees,
    op by op, in time order; tests/train/test_train_memory.py measures with it too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    held = peak = 0
    events = [e for e in profiler.events() if e.self_cpu_memory_usage]
    for event in sorted(events, key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def _subset(name: str, samples: int) -> Dataset:
    data = load_dataset(name)
    held_out = {field: getattr(data, field)[:64] for field in ("x_val", "y_val", "x_test", "y_test")
                if getattr(data, field) is not None}
    return dataclasses.replace(data, x_train=data.x_train[:samples], y_train=data.y_train[:samples],
                               **held_out)


def _trial(config: TrainConfig, data: Dataset) -> Callable[[], object]:
    return lambda: train(config, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3, help="look-aheads timed together in a round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for model_name, dataset in WORKLOADS:
        data = _subset(dataset, 256)
        torch.manual_seed(0)
        model = build_model(model_name, data)
        example = data.x_train[:2]
        copied = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))

        def look_ahead(model: nn.Module = model, example: torch.Tensor = example) -> None:
            functional.find_gemms(model, example)
            memory.activation_bytes_per_sample(model, example)

        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for kept in (True, False):
                _copies(kept)
                times[kept].append(_cpu_ms(look_ahead, args.repeats))
        _copies(True)
        config = TrainConfig(model=model_name, dataset=dataset, epochs=1, batch_size=64, format="int8",
                             optimizer="adam")
        step_ms = _cpu_ms(_trial(config, _subset(dataset, 64)), 1)
        kept_ms, bare_ms = (statistics.median(times[k]) for k in (True, False))
        print(f"{model_name} on {dataset}: {copied / 2**20:.2f} MiB copied; look-ahead {kept_ms:.2f} ms "
              f"with the copies, {bare_ms:.2f} ms without ({kept_ms / bare_ms:.2f}x): "
              f"+{kept_ms - bare_ms:.2f} ms, {(kept_ms - bare_ms) / step_ms:.3f} of a trial of one step "
              f"and its evaluation ({step_ms:.0f} ms)")
        for kept in (True, False):
            _copies(kept)
            look = peak_bytes(look_ahead)
            torch.manual_seed(0)
            planned = memory.trial_memory_bytes(build_model(model_name, data), example, 64, "adam", 256)
            trial = peak_bytes(_trial(config, data))
            print(f"  {'with' if kept else 'without'} the copies: look-ahead peak {look / 2**20:.2f} MiB, "
                  f"trial peak {trial / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB")
        _copies(True)


if __name__ == "__main__":
    main()
