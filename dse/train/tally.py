"""Each member's training loss over an epoch and its divergence, for a run alone and for a group.

A member diverges at the first batch whose loss is NaN or inf: from then on its batches no longer
count, and the epoch ends with its weights as they were before that batch's update, and its buffers
(BatchNorm's running statistics) and stochastic rounding generator as they were after that batch's
forward (a run alone stops there; a group goes on with the other members, whose batches update the
diverged member's statistics and draw from its generator too). The epoch's evaluation normalizes with
those statistics and quantizes with that generator, so without them a diverged member's accuracy
could differ from alone's (a diverging member under fp4 with stochastic rounding: 0.13 against 0.12;
a BatchNorm network under fp16 whose statistics went on to NaN in the group: 0.12 against 0.16).

On the CPU (`host_shortcuts`) each batch's losses are read back, which costs nothing there: a member
that diverges is known at once and its weights are copied then. On a GPU a read-back would stall
every launched kernel once a batch, so nothing is read back per batch: the sums, the counts and a
flag per member stay on the device, each parameter and buffer keeps a copy holding every member's
tensors at its last finite loss (one `torch.where` per parameter and batch), and `close` reads the epoch back
once. The sums are the same float64 additions in the same order either way, so both give the same
numbers, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dse.formats.base import constant
from dse.formats.fast import host_shortcuts


@dataclass
class EpochLosses:
    """What an epoch's batches gave: per member, the sum of its counted losses, how many batches it
    counted, and whether it diverged in this epoch."""

    totals: list[float]
    batches: list[int]
    diverged: list[bool]

    def mean(self, member: int) -> float:
        """The member's mean training loss over the epoch (NaN where it diverged)."""
        if self.diverged[member]:
            return math.nan
        return self.totals[member] / max(self.batches[member], 1)


def training_state(model: torch.nn.Module) -> list[Tensor]:
    """What a member's evaluation reads that its training changes: its weights and its buffers
    (BatchNorm's running statistics; in a group, every one stacked along the members' axis)."""
    return [*model.parameters(), *model.buffers()]


class EpochTally:
    """One epoch's losses of the members in `active` (indices along the leading axis of `params` when
    `stacked`, else one run alone: member 0 and 0-dim losses); `params` are `training_state`'s
    tensors, given back to a member that diverges as they were at its diverging batch."""

    def __init__(self, params: Sequence[Tensor], members: int, active: Iterable[int], stacked: bool,
                 generators: Sequence[torch.Generator] = ()) -> None:
        self.params = list(params)
        self.generators = list(generators)  # each member's stochastic rounding stream (empty: none)
        self.members = members
        self.stacked = stacked
        device = self.params[0].device if self.params else torch.device("cpu")
        self.on_host = host_shortcuts(device)
        active = set(active)
        self.active = sorted(active)
        self.totals = [0.0] * members
        self.batches = [0] * members
        self.frozen: dict[int, list[Tensor]] = {}  # (host) weights and buffers of members that diverged
        self.frozen_draws: dict[int, Tensor] = {}  # (host) their generators' states
        self.draws: list[list[Tensor]] = []  # (device) every generator's state at each batch
        if not self.on_host:
            self.live = torch.tensor([g in active for g in range(members)], device=device)
            self.sums = torch.zeros(members, dtype=torch.float64, device=device)
            self.counts = torch.zeros(members, dtype=torch.int64, device=device)
            self.kept = [p.detach().clone() for p in self.params]  # tensors at each member's last finite loss

    def add(self, losses: Tensor) -> bool:
        """Count one batch's losses ((members,), or 0-dim alone), before its update; True when every
        active member has diverged (known at once on the CPU only: on a device, at `close`)."""
        if self.on_host:
            values = losses.detach().reshape(-1).tolist()
            for g in self.active:
                if g in self.frozen:
                    continue
                if not math.isfinite(values[g]):
                    self.frozen[g] = [self._member(p.detach(), g).clone() for p in self.params]
                    if self.generators:
                        self.frozen_draws[g] = self.generators[g].get_state()
                else:
                    self.totals[g] += values[g]
                    self.batches[g] += 1
            return all(g in self.frozen for g in self.active)
        self.draws.append([generator.get_state() for generator in self.generators])  # (host-side states)
        with torch.no_grad():
            live = self.live
            for p, kept in zip(self.params, self.kept, strict=True):
                mask = live.view(-1, *[1] * (p.dim() - 1)) if self.stacked else live[0]
                torch.where(mask, p, kept, out=kept)
            losses = losses.detach().reshape(-1).double()
            live &= torch.isfinite(losses)
            self.sums.add_(torch.where(live, losses, constant(0.0, torch.float64, losses.device)))
            self.counts.add_(live)
        return False

    def close(self) -> EpochLosses:
        """The epoch's losses (one read back on a device), with every member that diverged in it given
        back its weights from before the batch that diverged (its buffers and generator as that
        batch's forward left them)."""
        if self.on_host:
            frozen, frozen_draws = self.frozen, self.frozen_draws
            totals, batches = self.totals, self.batches
        else:
            sums, counts, live = torch.cat([self.sums, self.counts.double(), self.live.double()]).view(
                3, -1).tolist()
            totals, batches = sums, [int(count) for count in counts]
            frozen = {g: [self._member(kept, g) for kept in self.kept] for g in self.active if not live[g]}
            frozen_draws = {g: self.draws[batches[g]][g] for g in frozen if self.generators}
        with torch.no_grad():
            for g, weights in frozen.items():
                for p, saved in zip(self.params, weights, strict=True):
                    self._member(p, g).copy_(saved)
        for g, state in frozen_draws.items():
            self.generators[g].set_state(state)
        return EpochLosses(totals, batches, [g in frozen for g in range(self.members)])

    def _member(self, t: Tensor, g: int) -> Tensor:
        """Member g's part of a parameter-shaped tensor (the whole of it for a run alone)."""
        return t[g] if self.stacked else t


def members_finite(params: Sequence[Tensor], members: int = 1) -> list[bool]:
    """Per member, whether all its weights are finite (one read back): `params` stacked along a
    leading axis of `members`, or one run's own (members=1)."""
    finite = torch.ones(members, dtype=torch.bool, device=params[0].device)
    for p in params:
        finite &= torch.isfinite(p.detach()).reshape(members, -1).all(1)
    return finite.tolist()
