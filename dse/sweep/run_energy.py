"""The energy of a trial's training run, composed from what its batches cost (dse.sweep.energy) and the
iterations it trained in each epoch (TrainResult.epoch_iterations).

A run's iterations need not all cost the same: a warm-up trains its first epochs in fp32 before the
trial's formats start, an epoch's last batch is short where the batch size does not divide the training
set, a diverged run stops at the batch whose loss turned NaN or inf (that batch's forward ran, its
backward and update did not), and trials that differ in epochs or batch size train different numbers of
iterations. Plain arithmetic: no format, model or store is imported here, so the store can compose when
it loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def has_warmup(warmup_epochs: int, optimizer: str) -> bool:
    """Whether a trial trains its first `warmup_epochs` in fp32: every method but NITI, whose integer
    network trains from the first epoch, does (dse/train/loop.py `prepare`)."""
    return warmup_epochs > 0 and optimizer != "niti"


def epoch_batches(train_rows: int, batch_size: int) -> int:
    """Batches in one epoch over `train_rows` samples: the last one short where the size does not divide."""
    return -(-train_rows // batch_size)


def last_batch_rows(train_rows: int, batch_size: int) -> int:
    """Rows of an epoch's last batch (`batch_size` where it divides the training set)."""
    return train_rows - (epoch_batches(train_rows, batch_size) - 1) * batch_size


@dataclass(frozen=True)
class BatchEnergies:
    """What one configuration's batches cost in one workload column (mJ)."""

    iteration_mj: float
    """One iteration of a full batch: forward, backward and update."""
    last_iteration_mj: float
    """One iteration of an epoch's last batch, at its own rows (`iteration_mj` where the batch divides)."""
    forward_mj: float
    """The forward pass alone of a full batch (a diverging batch runs no more)."""
    last_forward_mj: float
    """The forward pass alone of an epoch's last batch."""
    epoch_batches: int
    """Batches in one epoch (`epoch_batches`)."""


@dataclass(frozen=True)
class RunEnergy:
    """A run's energy in one workload column."""

    total_mj: float
    """Every batch the run computed, each at its rows and in the formats it ran in: the iterations it
    trained and, for a run that diverged, the forward of the batch whose loss was not finite."""
    mean_mj: float
    """total_mj per iteration trained (NaN for a run that trained none): each cost weighted by its share
    of the iterations, so a run whose iterations all cost one iteration's energy has exactly that mean."""


def run_energy(epoch_iterations: Sequence[int], warmup_epochs: int, energies: BatchEnergies,
               warmup_energies: BatchEnergies | None, diverged: bool) -> RunEnergy:
    """The run that trained `epoch_iterations[e]` iterations in epoch e: its first `warmup_epochs` (0
    where the trial has no warm-up: `has_warmup`) at `warmup_energies`, the rest at `energies`. An epoch
    that trained every batch trained its last, short one; only a diverged run's last epoch trains fewer,
    cut by a loss that was not finite, and the forward of its next batch is priced too (a run that
    diverged with every batch trained had finite losses and non-finite weights: no forward more). Any
    other count is a run over another training set than the one priced: a ValueError. `warmup_energies`
    may be None only where no epoch trained in warm-up."""
    counts: dict[float, int] = {}  # what a batch's work cost (mJ) -> how many batches cost it
    for epoch, trained in enumerate(epoch_iterations):
        cost = energies
        if epoch < warmup_epochs:
            if warmup_energies is None:
                raise ValueError("a run with warm-up epochs needs its warm-up's batch energies")
            cost = warmup_energies
        batches = cost.epoch_batches
        cut = diverged and epoch == len(epoch_iterations) - 1
        if trained > batches or (trained < batches and not cut):
            raise ValueError(f"epoch {epoch} trained {trained} iterations, but an epoch has {batches} "
                             "batches")
        if trained == batches:
            _count(counts, cost.iteration_mj, batches - 1)
            _count(counts, cost.last_iteration_mj, 1)
        else:
            _count(counts, cost.iteration_mj, trained)
            _count(counts, cost.last_forward_mj if trained == batches - 1 else cost.forward_mj, 1)
    iterations = sum(epoch_iterations)
    total = math.fsum(mj * count for mj, count in counts.items())
    mean = math.fsum(mj * (count / iterations) for mj, count in counts.items()) if iterations else math.nan
    return RunEnergy(total_mj=total, mean_mj=mean)


def _count(counts: dict[float, int], mj: float, batches: int) -> None:
    """`batches` more batches that cost `mj` each: batches of equal cost are summed as one product, so a
    run whose every iteration cost the same totals iterations x that cost, and its mean is that cost to
    the last bit (a sum of its iterations one by one, divided, is not)."""
    if batches:
        counts[mj] = counts.get(mj, 0) + batches
