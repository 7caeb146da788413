"""How much memory one trial's training takes, and how many members of a group fit a device.

A stacked group (dse/train/stacked.py) holds G copies of everything that is a trial's own: weights,
their gradients, the quantized weights saved for the backward pass, optimizer state, and the
activations of the folded batch. The data and the code are shared: a group of G takes G times one
trial's training memory plus a constant. `trial_memory_bytes` estimates that per-trial memory from
one forward of two samples (the bytes of the tensors autograd saves for the backward pass and the
largest layer input plus output, per sample), scaled to the training batch and to the evaluation
chunk; `members_that_fit` says how many members a device holds, given how many groups share it at
once, so that grouped training (and the sweep, when it plans its groups) can split a group that
would not fit, and say so.

What a group's probes hold at more than one thread (dse/train/batched_sums.py: random operands of a
product's layout, the batched output, one member's output) is not counted apart: a probe runs when a
layout is first met and frees what it holds before the run goes on, away from the run's peak.
Measured with torch's profiler, int8, batch 64, 2 threads, a group of 32: the peak is the same with
the probes as with their answers replayed (nothing probed): transformer (sort) 570.5 MiB with 22
probes, CNN 53.5 MiB, MLP 6.9 MiB (digits), against 1027.1, 518.1 and 37.9 MiB planned
(`trial_memory_bytes` x 32); `test_a_groups_probes_stay_within_its_planned_memory` checks it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dse.train.attributes import Attributes, modules_outside, same_value

OPTIMIZER_STATE_COPIES: dict[str, int] = {
    "sgd": 1, "adam": 2, "adamw": 2, "madam": 1, "lns-madam": 2, "niti": 1,
}
"""Weight-sized tensors each optimizer keeps per weight (SGD's momentum buffer, Adam's two moments,
Madam's second moment, LNS-Madam's second moment and log codes, NITI's int32 accumulator)."""
WEIGHT_COPIES = 4
"""The weights, their gradients, the quantized weights saved for the backward pass and, on a GPU,
the weights kept at each member's last finite loss (dse/train/tally.py)."""
BACKWARD_FACTOR = 2
"""The backward pass holds the saved activations and, at its peak, about as much again in the
gradients of the activations it is working through (and the quantizers' temporaries)."""
MEMORY_FRACTION = 0.8
"""The share of a device's available memory that one group may plan to fill."""


def _distinct_bytes(tensors: list[Tensor]) -> int:
    """The bytes of the tensors, a tensor saved twice (the same data and size) counted once."""
    return sum({(t.data_ptr(), t.nbytes): t.nbytes for t in tensors}.values())


def activation_bytes_per_sample(model: nn.Module, example: Tensor) -> tuple[float, float]:
    """(bytes autograd saves for the backward pass, largest layer input + output) per sample, from
    one training-mode forward of `example` (model state, buffers and random generators left as they
    were; the model's own weights are not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[Tensor] = []
    largest = [0]

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t)
        return t

    def measure(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, Tensor)]
        largest[0] = max(largest[0], sum(t.nbytes for t in tensors))

    hooks = [m.register_forward_hook(measure) for m in model.modules() if not any(True for _ in m.children())]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[example.device] if example.is_cuda else []), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(), \
                state_kept(model):
            model.train()
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    samples = max(len(example), 1)
    return _distinct_bytes(saved) / samples, largest[0] / samples


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """The block (a look-ahead forward) with the model's buffers and parameters as they were after it:
    each module's own buffer tensors (one the forward set from None or reassigned: the one it had,
    None again) with their values (one it updated in place: its value before), and the parameters'
    values (a layer that clamps its weight in its forward), and each module's Python attributes
    (dse/train/attributes.py: a step counter, a running float, a list its forward appends to), which a
    trial alone and each member of a group then start training from alike; modules held outside the
    module tree (`modules_outside`: a BatchNorm in a Python list) alike.

    Every value is copied, not only those that changed: a write through `.data` bumps no version
    counter, so only a copy tells what a forward wrote. What the copies cost is small beside a trial
    (benchmarks/state_kept.py, one thread, load 8-11 on a 2-vCPU AMD EPYC): +0.2-1.6 ms a look-ahead
    pair on the built-in proxies, +96 ms on a 76.4 MiB MLP, about a tenth of one step and its
    evaluation; its peak and planned memory are the same with or without them (the copies live
    while the model's gradients and optimizer state do not yet)."""
    modules = [*model.modules(), *(module for _, module in modules_outside(model))]
    held = [(module, dict(module._buffers)) for module in modules]
    attributes = [Attributes(module) for module in modules]
    values = {id(b): (b, b.detach().clone()) for module in modules for b in module._buffers.values()
              if b is not None}
    weights = {id(p): (p, p.detach().clone()) for module in modules for p in module._parameters.values()
               if p is not None}
    try:
        yield
    finally:
        for module, own in held:
            module._buffers.clear()
            module._buffers.update(own)
        for kept in attributes:
            kept.restore()
        with torch.no_grad():
            for b, value in values.values():
                b.copy_(value)
            for p, value in weights.values():
                if not same_value(p, value):  # (no version bump where nothing was written; a -0.0
                    p.copy_(value)            # written over a 0.0 was)


def trial_memory_bytes(model: nn.Module, example: Tensor, batch_size: int, optimizer: str,
                       eval_batch: int) -> int:
    """One trial's training memory (an estimate that errs high): its weights, gradients, quantized
    weight copies and optimizer state, plus the larger of a training batch's activations through
    the backward pass and an evaluation chunk's largest layer."""
    weight_bytes = sum(p.nbytes for p in model.parameters())
    copies = WEIGHT_COPIES + OPTIMIZER_STATE_COPIES.get(optimizer, 2)
    saved, largest = activation_bytes_per_sample(model, example)
    activations = max(BACKWARD_FACTOR * saved * batch_size, largest * eval_batch)
    return math.ceil(weight_bytes * copies + activations)


def available_memory_bytes(device: str) -> int:
    """Memory free for a new group on `device`: CUDA's free memory, or the host's available memory
    (MemAvailable in /proc/meminfo where there is one, else free pages)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def members_that_fit(trial_bytes: int, available_bytes: int, groups_at_once: int = 1) -> int:
    """How many members one group may have on a device with `available_bytes` free that
    `groups_at_once` groups share (several workers on one host's memory or on one GPU): each group
    plans to fill MEMORY_FRACTION of its equal share. At least 1: a trial that does not fit alone runs
    alone, as it would ungrouped."""
    share = available_bytes // max(groups_at_once, 1)
    return max(1, int(share * MEMORY_FRACTION) // max(trial_bytes, 1))


def describe_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
