"""Which trials of a sweep train together as one stacked network (dse/train/grouped.py).

The groups come from the sweep file alone: the trials in plan order, bucketed by task and by
everything but the fields members may differ in (seed, lr, momentum, weight decay, p_scale,
g_bound, niti_mu), each bucket cut into consecutive groups of `executor.group_size`. Neither the worker
count nor what the store already holds changes them, so a sweep trains every trial in the same
group whether it runs on one worker or eight, fresh or resumed (a group with some members stored
reruns whole; the runner stores only the missing ones).

The one thing beside the file that cuts a group is memory: a group that would not fit its share of
its device is cut into consecutive smaller groups, and a line says so. The share: the memory the
device has available when the sweep is planned (dse/train/memory.py), measured once per device,
divided equally among the groups that train on it at once (`groups_at_once`: the local pool's
workers share this host's memory, and every local worker trains on the one GPU `device` names; a
Ray task reserves a whole GPU). So the split depends on the machine and the executor settings, the
worker count included; the results do not: every member computes what it computes alone, in a group
of any size (tests/sweep/test_sweep_groups.py checks it bit for bit), so a split changes how fast a
sweep runs, never what it stores. On a Ray cluster (`address`) the nodes' memory is not visible
here: each task splits its group on its node, by its share of the node's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dse.data import Dataset
from dse.sweep.config import ExecutorConfig
from dse.sweep.trials import Trial
from dse.train.config import TrainConfig
from dse.train.grouped import group_key, group_reason, split_note, trial_training_bytes
from dse.train.loop import EXAMPLE_SAMPLES
from dse.train.memory import available_memory_bytes, members_that_fit

ModelOf = Callable[[TrainConfig], tuple[nn.Module, Dataset]]
"""A config's network and its dataset (with its validation split, as a run sees it)."""


def _model_of(config: TrainConfig) -> tuple[nn.Module, Dataset]:
    from dse.data import load_dataset, with_validation
    from dse.models.proxies import build_model

    data = with_validation(load_dataset(config.dataset, config.data_dir))
    with torch.random.fork_rng(devices=[]):
        return build_model(config.model, data), data


def groups_at_once(executor: ExecutorConfig, device: str) -> int | None:
    """How many groups train at once on one `device` under these executor settings; None where this
    process cannot see the device (a Ray cluster's nodes: each task decides on its node)."""
    cuda = device.startswith("cuda")
    if executor.backend == "local":
        return executor.workers  # one host's memory; on CUDA, every worker on the device named
    if executor.address is not None:
        return None
    return 1 if cuda else max(1, executor.workers // executor.threads)  # a local Ray instance's CPUs


@dataclass(frozen=True)
class DeviceShare:
    """A device as a sweep plans for it: the memory it had available when measured, and how many
    groups train on it at once (each may plan to fill its equal share)."""

    available_bytes: int
    groups_at_once: int


def device_shares(runs: list[Trial], executor: ExecutorConfig | None = None) -> dict[str, DeviceShare]:
    """Each device the runs train on, measured now, with the groups it trains at once (one without
    `executor`); devices this process cannot see (`groups_at_once` None) are left out."""
    shares: dict[str, DeviceShare] = {}
    for device in dict.fromkeys(trial.config.device for trial in runs):
        at_once = 1 if executor is None else groups_at_once(executor, device)
        if at_once is not None:
            shares[device] = DeviceShare(available_memory_bytes(device), at_once)
    return shares


GROUP_SIZE = 8
"""The default group size where grouping was measured to pay (docs/training.md, *Speed of grouped
training*): per member, 16 was 3-26 % cheaper than 8 on the MLPs, but halves the jobs a sweep of one
configuration can spread over the workers."""

UNPAID_GROUPING: dict[tuple[str, str], str] = {
    ("transformer", "cpu"): "on the CPU a transformer group's member trained 0.77-0.99x as fast as alone",
    ("resnet", "cpu"): "on the CPU a ResNet group's member trained 0.82-1.17x as fast as alone",
}
"""(built-in model, device type) where the default trains trials one by one, and why: a group member
was measured no faster than its run alone (benchmarks/grouped.py, docs/training.md, *Speed of grouped
training*). An explicit `group_size` still groups them."""


def default_group_size(config: TrainConfig) -> tuple[int, str | None]:
    """(the group size a trial of `config` gets where the sweep file gives none, why it is 1 where
    it is): GROUP_SIZE, or 1 where UNPAID_GROUPING lists the model on the device's type. Users' models
    and CUDA devices group by GROUP_SIZE (a launch-bound GPU step is where groups pay most)."""
    why = UNPAID_GROUPING.get((config.model, torch.device(config.device).type))
    return (1, why) if why is not None else (GROUP_SIZE, None)


def plan_groups(runs: list[Trial], group_size: int | None, model_of: ModelOf = _model_of,
                shares: Mapping[str, DeviceShare] | None = None) -> tuple[list[list[Trial]], list[str]]:
    """(the groups, in plan order of their first trial; one line per bucket that trains one by one
    and why, or whose groups are split to fit their share of the device's memory: `shares`, default
    each device measured now with one group at a time; a device left out is not split here).
    `group_size` 1 puts every trial in a group of its own, with no lines; None gives each bucket its
    model's default on its device (`default_group_size`), with a line where that is 1."""
    buckets: dict[tuple[str, str], list[Trial]] = {}
    for trial in runs:
        buckets.setdefault((trial.task, group_key(trial.config)), []).append(trial)
    if shares is None:
        shares = device_shares(runs)
    groups: list[list[Trial]] = []
    notes: list[str] = []
    models: dict[tuple[str, str, str | None], tuple[nn.Module, Dataset]] = {}
    # group_reason depends on the network, the optimizer, the batch size and the largest group only:
    # one check each, not per bucket
    reasons: dict[tuple[str, str, str | None, str, int, int], str | None] = {}
    for trials in buckets.values():
        reason = None
        size, unpaid = (group_size, None) if group_size is not None else default_group_size(trials[0].config)
        if unpaid is not None and len(trials) > 1:
            reason = f"{unpaid}, docs/training.md; executor.group_size groups them anyway"
        if size > 1 and len(trials) > 1:
            config = trials[0].config
            where = (config.model, config.dataset, config.data_dir)
            if where not in models:
                models[where] = model_of(config)
            largest = min(size, len(trials))  # every group has 2 to `largest` members, split or not
            key = (*where, config.optimizer, config.batch_size, largest)
            if key not in reasons:
                reasons[key] = group_reason(config, *models[where], range(2, largest + 1))
            reason = reasons[key]
        note = f"{trials[0].task}: {trials[0].label}: trained one by one ({reason})"
        if reason is not None and note not in notes:
            notes.append(note)
        size = 1 if reason is not None else size
        config = trials[0].config
        share = shares.get(config.device)
        if size > 1 and len(trials) > 1 and share is not None:
            model, data = models[(config.model, config.dataset, config.data_dir)]
            one = trial_training_bytes(config, model, data.x_train[:EXAMPLE_SAMPLES])
            fit = members_that_fit(one, share.available_bytes, share.groups_at_once)
            if fit < min(size, len(trials)):
                note = split_note(size, fit, one, share.available_bytes, config.device, share.groups_at_once)
                notes.append(f"{trials[0].task}: {trials[0].label}: {note}")
                size = fit
        groups += [trials[start:start + size] for start in range(0, len(trials), size)]
    order = {trial.trial_id: index for index, trial in enumerate(runs)}
    groups.sort(key=lambda group: order[group[0].trial_id])
    return groups, notes
