"""EpochTally: a group's tally leaves each member, diverged or not, as the tally of its run alone does."""

from __future__ import annotations

import contextlib
import math
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats.fast import device_path
from dse.train.tally import EpochTally

BATCHES = 4
EPOCHS = 2
Tensors = list[torch.Tensor]


def _train(members: int, stacked: bool, seeds: list[int], divergence: list[int | None],
           losses: list[list[float]], on_device: bool) -> tuple[list[list[float]], list[list[int]],
                                                               list[bool], list[Tensors]]:
    """A training loop's use of the tally (loop.py alone, grouped.py for a group) on a stand-in network:
    each batch's forward draws from each member's generator into a buffer (BatchNorm's statistics),
    its loss is NaN at the member's diverging batch (`divergence`: epoch * BATCHES + batch) and
    anything after, its step draws into the weight (a group's later epochs train a diverged member
    too). Returns per epoch the totals and the counts, per member whether it diverged, and each
    member's weight, buffer and generator state where its run ends (the epoch it diverged, or the
    last)."""
    shape = (members,) if stacked else ()
    weight = torch.zeros(*shape, 3, dtype=torch.float64)
    buffer = torch.zeros(*shape, 2)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    running = list(range(members))
    totals, counts, diverged = [], [], [False] * members
    state: list[Tensors] = [[] for _ in range(members)]
    with device_path() if on_device else contextlib.nullcontext():
        for epoch in range(EPOCHS):
            tally = EpochTally([weight, buffer], members, running, stacked=stacked, generators=generators)
            for batch in range(BATCHES):
                step = epoch * BATCHES + batch
                for g in range(members):
                    part = buffer[g] if stacked else buffer
                    part.add_(torch.rand(2, generator=generators[g]))
                values = torch.tensor([math.nan if divergence[g] is not None and step >= divergence[g]
                                       else losses[g][step] for g in range(members)], dtype=torch.float64)
                if tally.add(values if stacked else values[0]):
                    break
                for g in range(members):
                    part = weight[g] if stacked else weight
                    part.add_(torch.rand(3, generator=generators[g], dtype=torch.float64))
            epoch_losses = tally.close()
            totals.append(epoch_losses.totals)
            counts.append(epoch_losses.batches)
            for g in list(running):
                diverged[g] |= epoch_losses.diverged[g]
                if diverged[g] or epoch == EPOCHS - 1:  # (what its evaluation reads, its results' last)
                    state[g] = [(weight[g] if stacked else weight).clone(),
                                (buffer[g] if stacked else buffer).clone(), generators[g].get_state()]
                if diverged[g]:
                    running.remove(g)
            if not running:
                break
    return totals, counts, diverged, state


@settings(max_examples=60, deadline=None)
@given(divergence=st.lists(st.one_of(st.none(), st.integers(0, EPOCHS * BATCHES - 1)),
                           min_size=1, max_size=3),
       on_device=st.booleans(), seed=st.integers(0, 2**16))
def test_a_diverged_members_weights_buffers_and_draws_are_its_run_alones(
        divergence: list[int | None], on_device: bool, seed: int) -> None:
    """Each member of a group (any members diverging at any batch: the first, an epoch's last, in a
    later epoch, two at different batches) ends with the losses, weights, buffers and generator state
    its run alone ends with, on the CPU path (read per batch) and on the device path (read at close)."""
    members = len(divergence)
    rng = random.Random(seed)
    losses = [[rng.uniform(0.0, 3.0) for _ in range(EPOCHS * BATCHES)] for _ in divergence]
    seeds = [seed + g for g in range(members)]
    totals, counts, diverged, state = _train(members, True, seeds, divergence, losses, on_device)
    for g in range(members):
        alone = _train(1, False, [seeds[g]], [divergence[g]], [losses[g]], on_device=False)  # (stops there)
        alone_on_device = _train(1, False, [seeds[g]], [divergence[g]], [losses[g]], on_device)
        assert repr(alone_on_device[:3]) == repr(alone[:3])
        epochs = len(alone[0])
        assert [t[g] for t in totals[:epochs]] == [t[0] for t in alone[0]]
        assert [c[g] for c in counts[:epochs]] == [c[0] for c in alone[1]]
        assert diverged[g] == alone[2][0] == (divergence[g] is not None)
        for together, by_itself, on_its_device in zip(state[g], alone[3][0], alone_on_device[3][0],
                                                      strict=True):
            assert torch.equal(together, by_itself) and torch.equal(on_its_device, by_itself)
