"""The energy of a trial's training run, composed from per-iteration energies (dse.sweep.energy) and
the iterations it trained in each epoch (TrainResult.epoch_iterations).

A run's iterations need not all cost the same: a warm-up trains its first epochs in fp32 before the
trial's formats start, a diverged run stops at the batch its loss turned NaN or inf, and trials that
differ in epochs or batch size train different numbers of iterations. Plain arithmetic: no format,
model or store is imported here, so the store can compose when it loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def has_warmup(warmup_epochs: int, optimizer: str) -> bool:
    """Whether a trial trains its first `warmup_epochs` in fp32: every method but NITI, whose integer
    network trains from the first epoch, does (dse/train/loop.py `prepare`)."""
    return warmup_epochs > 0 and optimizer != "niti"


@dataclass(frozen=True)
class RunIterations:
    """The iterations a trial trained, split by the formats they ran in."""

    warmup: int
    """In the warm-up's fp32 (dse.sweep.energy.warmup_config)."""
    formats: int
    """In the trial's own formats."""

    @property
    def total(self) -> int:
        return self.warmup + self.formats


def run_iterations(epoch_iterations: Sequence[int], warmup_epochs: int) -> RunIterations:
    """Split the iterations of each epoch (TrainResult.epoch_iterations) into the first `warmup_epochs`
    (0 where the trial has no warm-up: `has_warmup`) and the rest."""
    return RunIterations(warmup=sum(epoch_iterations[:warmup_epochs]),
                         formats=sum(epoch_iterations[warmup_epochs:]))


@dataclass(frozen=True)
class RunEnergy:
    """A run's energy in one workload column."""

    total_mj: float
    """Sum over the iterations trained of each one's energy in the formats it ran in."""
    mean_mj: float
    """total_mj per iteration (NaN for a run that trained none)."""


def run_energy(iterations: RunIterations, iteration_mj: float,
               warmup_iteration_mj: float | None) -> RunEnergy:
    """Warm-up iterations at the warm-up's energy, the rest at the trial's own (`iteration_mj`, mJ).
    `warmup_iteration_mj` may be None only when no iteration ran in warm-up."""
    total = iterations.formats * iteration_mj
    if iterations.warmup:
        if warmup_iteration_mj is None:
            raise ValueError("a run with warm-up iterations needs the warm-up's iteration energy")
        total += iterations.warmup * warmup_iteration_mj
    return RunEnergy(total_mj=total, mean_mj=total / iterations.total if iterations.total else math.nan)
