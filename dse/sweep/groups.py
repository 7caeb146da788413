"""Which trials of a sweep train together as one stacked network (dse/train/grouped.py).

The groups come from the sweep file alone: the trials in plan order, bucketed by task and by
everything but the fields members may differ in (seed, lr, momentum, weight decay, p_scale,
g_bound, niti_mu), each bucket cut into consecutive groups of `executor.group_size`. Neither the worker
count nor what the store already holds changes them, so a sweep trains every trial in the same
group whether it runs on one worker or eight, fresh or resumed (a group with some members stored
reruns whole; the runner stores only the missing ones).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dse.sweep.trials import Trial
from dse.train.config import TrainConfig
from dse.train.grouped import group_key, group_reason


def _model_of(config: TrainConfig) -> nn.Module:
    from dse.data import load_dataset
    from dse.models.proxies import build_model

    return build_model(config.model, load_dataset(config.dataset, config.data_dir))


def plan_groups(runs: list[Trial], group_size: int, model_of: Callable[[TrainConfig], nn.Module] = _model_of
                ) -> tuple[list[list[Trial]], list[str]]:
    """(the groups, in plan order of their first trial; one line per bucket that trains one by one
    and why). `group_size` 1 puts every trial in a group of its own, with no lines."""
    buckets: dict[tuple[str, str], list[Trial]] = {}
    for trial in runs:
        buckets.setdefault((trial.task, group_key(trial.config)), []).append(trial)
    groups: list[list[Trial]] = []
    notes: list[str] = []
    models: dict[tuple[str, str, str | None], nn.Module] = {}
    for trials in buckets.values():
        reason = None
        if group_size > 1 and len(trials) > 1:
            config = trials[0].config
            where = (config.model, config.dataset, config.data_dir)
            if where not in models:
                models[where] = model_of(config)
            reason = group_reason(config, models[where])
        note = f"{trials[0].task}: {trials[0].label}: trained one by one ({reason})"
        if reason is not None and note not in notes:
            notes.append(note)
        size = 1 if reason is not None else group_size
        groups += [trials[start:start + size] for start in range(0, len(trials), size)]
    order = {trial.trial_id: index for index, trial in enumerate(runs)}
    groups.sort(key=lambda group: order[group[0].trial_id])
    return groups, notes
