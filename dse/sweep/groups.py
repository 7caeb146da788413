"""Which trials of a sweep train together as one stacked network (dse/train/grouped.py).

The groups come from the sweep file alone: the trials in plan order, bucketed by task and by
everything but the fields members may differ in (seed, lr, momentum, weight decay, p_scale,
g_bound, niti_mu), each bucket cut into consecutive groups of `executor.group_size`. Neither the worker
count nor what the store already holds changes them, so a sweep trains every trial in the same
group whether it runs on one worker or eight, fresh or resumed (a group with some members stored
reruns whole; the runner stores only the missing ones). The one exception is memory: a group that
would not fit its device (dse/train/memory.py, against the memory available when the sweep is
planned) is cut into smaller groups, and a line says so; every member's result is the same in a
group of any size, so a split changes how fast a sweep runs, never what it stores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dse.sweep.trials import Trial
from dse.train.config import TrainConfig
from dse.train.grouped import group_key, group_memory, group_reason, split_note
from dse.train.memory import members_that_fit

ModelOf = Callable[[TrainConfig], tuple[nn.Module, Tensor]]
"""A config's network and a few of its training samples."""


def _model_of(config: TrainConfig) -> tuple[nn.Module, Tensor]:
    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.train.loop import EXAMPLE_SAMPLES

    data = load_dataset(config.dataset, config.data_dir)
    with torch.random.fork_rng(devices=[]):
        return build_model(config.model, data), data.x_train[:EXAMPLE_SAMPLES]


def plan_groups(runs: list[Trial], group_size: int, model_of: ModelOf = _model_of,
                available_bytes: int | None = None) -> tuple[list[list[Trial]], list[str]]:
    """(the groups, in plan order of their first trial; one line per bucket that trains one by one
    and why, or whose groups are split to fit the device's memory: `available_bytes`, default what
    the device has available now). `group_size` 1 puts every trial in a group of its own, with no
    lines."""
    buckets: dict[tuple[str, str], list[Trial]] = {}
    for trial in runs:
        buckets.setdefault((trial.task, group_key(trial.config)), []).append(trial)
    groups: list[list[Trial]] = []
    notes: list[str] = []
    models: dict[tuple[str, str, str | None], tuple[nn.Module, Tensor]] = {}
    # group_reason depends on the network and the optimizer only: one check forward each, not per bucket
    reasons: dict[tuple[str, str, str | None, str], str | None] = {}
    for trials in buckets.values():
        reason = None
        if group_size > 1 and len(trials) > 1:
            config = trials[0].config
            where = (config.model, config.dataset, config.data_dir)
            if where not in models:
                models[where] = model_of(config)
            key = (*where, config.optimizer)
            if key not in reasons:
                reasons[key] = group_reason(config, *models[where])
            reason = reasons[key]
        note = f"{trials[0].task}: {trials[0].label}: trained one by one ({reason})"
        if reason is not None and note not in notes:
            notes.append(note)
        size = 1 if reason is not None else group_size
        if size > 1 and len(trials) > 1:
            config = trials[0].config
            trial_bytes, available = group_memory(config, *models[(config.model, config.dataset,
                                                                   config.data_dir)])
            available = available if available_bytes is None else available_bytes
            fit = members_that_fit(trial_bytes, available)
            if fit < min(size, len(trials)):
                notes.append(f"{trials[0].task}: {trials[0].label}: "
                             f"{split_note(size, fit, trial_bytes, available, config.device)}")
                size = fit
        groups += [trials[start:start + size] for start in range(0, len(trials), size)]
    order = {trial.trial_id: index for index, trial in enumerate(runs)}
    groups.sort(key=lambda group: order[group[0].trial_id])
    return groups, notes
