"""Grouped training: trials that differ only in their seed and optimizer hyperparameters train
together as one stacked network (dse/train/stacked.py), so each torch operation is dispatched once
for the whole group instead of once per trial.

Every member keeps what makes it its own run: its initial weights (built from its seed, as alone),
its data order, its stochastic-rounding generator, its scales (a per-tensor scale becomes a scale
per member), its learning rate, momentum, weight decay, p_scale, g_bound and niti_mu, and its divergence (a
member whose loss turns non-finite is recorded as diverged with the weights it had then, and the
others go on). `train_group(configs)` returns for each config what `dse.train.loop.train` returns
for it alone, bit for bit on the CPU (tests/train/test_train_grouped.py); only wall_time_s differs: each
member is given the group's time over the group's size.

NITI stacks its own way (dse/train/niti/stacked.py: exponents per member, integer GEMMs) every
network the other methods stack whose GEMMs are NITI layers (Linear, Conv, Embedding, attention's
Matmul: every built-in proxy; not GEMMs called as functions). The other methods stack every
network whose layers `dse.train.stacked.stack_reason` knows (every built-in proxy, users' networks
with GEMM function calls and torch's attention modules); other models train one by one
(`group_reason` says why: a GEMM taking a view of a parameter, tied weights, dropout, a batch on
another axis than the first, a user's autograd.Function whose backward calls a position-dependent
function: `backward_reason`, a forward that depends on its batch's size: `batch_size_reason`).
Activation checkpointing and a network calling itself stack, each member bit for bit
(dse/train/recompute.py, dse/train/member_kernels.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from dse.data import Dataset, load_dataset, with_validation
from dse.formats.base import MemberGenerators
from dse.models.proxies import MODELS, build_model
from dse.train.batch_dependence import Forward, batch_size_reason, forwards_of
from dse.train.config import TrainConfig, TrainResult
from dse.train.layers import QuantSwitch
from dse.train.loop import EVAL_BATCH, EXAMPLE_SAMPLES, _run_settings, check_config, train
from dse.train.member_kernels import (
    AmbiguousMemberAxisWarning,
    MemberAxisLost,
    UnsplitCalls,
    may_call_position_dependent,
)
from dse.train.memory import available_memory_bytes, describe_bytes, members_that_fit, trial_memory_bytes
from dse.train.optim import DEFAULT_LR, STATE_KEYS, madam_optimizer, plain_optimizer, plain_param_group
from dse.train.policy import QuantPolicy, TensorQuant
from dse.train.recompute import replaying
from dse.train.schedule import lr_factor
from dse.train.stacked import (
    MemberStateUnstacked,
    attributes_apart,
    stack_models,
    stack_reason,
    stored_weights,
)
from dse.train.tally import EpochTally, members_finite, training_state

MEMBER_FIELDS: tuple[str, ...] = ("seed", "lr", "momentum", "weight_decay", "p_scale", "g_bound", "niti_mu")
"""TrainConfig fields in which the members of a group may differ."""

STACKED_OPTIMIZERS: tuple[str, ...] = ("madam", "lns-madam")
"""Optimizers that step the whole group as one (`Madam.members`); the others one per run of members."""


def group_key(config: TrainConfig) -> str:
    """Configs with equal keys can train as one group: everything but MEMBER_FIELDS is equal."""
    data = config.to_dict()
    for name in MEMBER_FIELDS:
        data.pop(name)
    return json.dumps(data, sort_keys=True, default=str)


GROUP_MEMBERS: tuple[int, ...] = tuple(range(2, 9))
"""The member counts `group_reason` checks where it is not told the groups' (a sweep's default size, 8,
and every smaller one: the last group of a configuration and a group split to fit memory)."""


def group_reason(config: TrainConfig, model: nn.Module | None = None, data: Dataset | None = None,
                 members: Iterable[int] = GROUP_MEMBERS) -> str | None:
    """Why trials of this config train one by one rather than stacked in groups of `members` (every
    member count a group may have; None: they stack). `model` is the config's network and `data` its
    dataset with its validation split (both built from the config when not given)."""
    if data is None:
        data = with_validation(load_dataset(config.dataset, config.data_dir))
    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = build_model(config.model, data)
    example = data.x_train[:EXAMPLE_SAMPLES]
    if config.optimizer == "niti":
        from dse.train.niti.stacked import niti_stack_reason

        reason = niti_stack_reason(model, example)
    else:
        reason = stack_reason(model, example)
    if reason is None:
        reason = backward_reason(model, example)
    if reason is None and config.model not in MODELS:
        # a user's network only: dse's own proxies are checked once, by a test
        # (test_the_built_in_proxies_and_the_example_network_do_not_depend_on_the_batch_size), since the
        # check's first meta-device forward imports torch._dynamo (0.8 s in every process that groups)
        reason = batch_size_reason(model, example, run_forwards(config, data), members)
    return None if reason is None else f"model {config.model!r}: {reason}"


def run_forwards(config: TrainConfig, data: Dataset) -> list[Forward]:
    """Every size of forward `train` runs for `config` on `data` (with its validation split)."""
    assert data.x_val is not None
    eval_batch = config.batch_size if config.optimizer == "niti" else EVAL_BATCH  # as niti_setup has it
    return forwards_of(config.batch_size, eval_batch, len(data.x_train), [len(data.x_val), len(data.x_test)])


CHECK_ROWS = 3
"""A member's batch in `backward_reason`'s check: odd, so that a member's block of an activation
wider than a multiple of 64 features is never whole vector blocks (the member mode splits it, as it
does in training for most batch sizes), and no multiple of its 2 members (`UnsplitCalls`)."""


def backward_reason(model: nn.Module, example: Tensor) -> str | None:
    """Why a group's backward would not give each member the gradient it gets alone (None: it would,
    or the network calls none of the position-dependent functions of dse/train/member_kernels.py):
    its forward or backward fails in a group (a recomputation outside torch.utils.checkpoint's own
    functions, which dse/train/recompute.py does not run under the member mode, saves other tensors
    than the forward did), or a user's autograd.Function's backward, which runs outside every
    torch-function mode, calls one of those functions on the group's tensors. Found by one forward and
    backward of 2 stacked copies of the network on CHECK_ROWS samples each, over every tensor of its
    output (a tensor, or any nesting of tuples, lists and dicts). A Function this forward does not
    reach (a branch taken later, in other inputs) is watched while the group trains
    (`BackwardUnsplit`)."""
    if not may_call_position_dependent(model):
        return None
    rows = example.repeat(-(-CHECK_ROWS // len(example)), *[1] * (example.dim() - 1))[:CHECK_ROWS]
    members = 2
    devices = [example.device] if example.is_cuda else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore", AmbiguousMemberAxisWarning)  # a few samples: sizes coincide
        copies = [copy.deepcopy(model) for _ in range(members)]
        group = stack_models(copies, None, QuantSwitch(), None, example)
        try:
            outputs = group(torch.stack([rows, rows.flip(0)]))
        except Exception as error:
            return f"its forward fails in a group ({_first_line(error)})"
        leaves = [t for t in tree_leaves(outputs) if isinstance(t, Tensor) and t.requires_grad]
        if not leaves:
            return None
        spies = {cls: UnsplitCalls(members, CHECK_ROWS) for cls in _user_functions(leaves)}
        try:
            with _backwards_spied(spies):
                torch.autograd.backward([t.float().sum() for t in leaves])
        except Exception as error:
            return f"its backward fails in a group ({_first_line(error)})"
    return _unsplit_reason(spies)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _unsplit_reason(spies: dict[type[torch.autograd.Function], UnsplitCalls]) -> str | None:
    for cls, unsplit in spies.items():
        if unsplit.calls:
            return (f"the backward of its autograd.Function {cls.__name__} calls {', '.join(unsplit.calls)} "
                    f"on the group's tensors, outside the member mode (a member may get other last bits "
                    f"than alone)")
    return None


class BackwardUnsplit(Exception):
    """Found while a group trained: a user's autograd.Function that `backward_reason`'s forward did not
    reach calls a position-dependent function on the group's tensors in its backward."""


def _defined_user_functions() -> list[type[torch.autograd.Function]]:
    """Every autograd.Function class defined so far outside dse and torch."""
    found: dict[type[torch.autograd.Function], None] = {}
    classes = list(torch.autograd.Function.__subclasses__())
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if not cls.__module__.startswith(("dse.", "torch.")):
            found.setdefault(cls)
    return list(found)


@contextlib.contextmanager
def _user_backwards_watched(model: nn.Module, members: int, rows: int
                            ) -> Iterator[dict[type[torch.autograd.Function], UnsplitCalls]]:
    """While a group trains, every user autograd.Function's backward spied (`backward_reason`'s check
    covers one forward; a branch taken later is caught at its first backward, before any step)."""
    if not may_call_position_dependent(model):
        yield {}
        return
    spies = {cls: UnsplitCalls(members, rows) for cls in _defined_user_functions()}
    with _backwards_spied(spies):
        yield spies


def _user_functions(outputs: list[Tensor]) -> list[type[torch.autograd.Function]]:
    """The autograd.Function classes of the graph behind `outputs` defined outside dse and torch."""
    found: dict[type[torch.autograd.Function], None] = {}
    seen: set[int] = set()
    nodes = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while nodes:
        node = nodes.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)
                and not cls.__module__.startswith(("dse.", "torch."))):
            found.setdefault(cls)
        nodes += [next_node for next_node, _ in node.next_functions if next_node is not None]
    return list(found)


@contextlib.contextmanager
def _backwards_spied(spies: dict[type[torch.autograd.Function], UnsplitCalls]) -> Iterator[None]:
    """The block with each autograd.Function's backward (or vjp) run under its spy: the autograd
    engine runs a backward with no torch-function mode on the stack, the ones around `backward()`
    included."""
    originals: dict[tuple[type[torch.autograd.Function], str], Any] = {}

    def spied(backward: Callable[..., Any], spy: UnsplitCalls) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            with spy:
                return backward(*args)
        return run

    try:
        for cls, spy in spies.items():
            name = "vjp" if cls.vjp is not torch.autograd.Function.vjp else "backward"
            originals[(cls, name)] = cls.__dict__.get(name)
            setattr(cls, name, staticmethod(spied(getattr(cls, name), spy)))
        yield
    finally:
        for (cls, name), original in originals.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


class GroupSplitWarning(UserWarning):
    """A group trains otherwise than planned: too large for its device's memory, as consecutive
    smaller groups; or one by one from the start, its work so far thrown away, a user's Function found
    while it trained (`BackwardUnsplit`), a layer's buffers its members set apart or a module run once
    for all of them writing new state (`MemberStateUnstacked`), or a forward that interleaved its
    members' samples with another axis (`MemberAxisLost`)."""


def trial_training_bytes(config: TrainConfig, model: nn.Module, example: Tensor) -> int:
    """One trial's training memory in bytes (dse/train/memory.py: a group of G takes G times it plus
    a constant)."""
    return trial_memory_bytes(model, example, config.batch_size, config.optimizer, EVAL_BATCH)


def split_note(size: int, fit: int, trial_bytes: int, available_bytes: int, device: str,
               groups_at_once: int = 1) -> str:
    """The line that states a split: a group of `size` cut into groups of at most `fit`."""
    shared = f", shared by {groups_at_once} groups training at once" if groups_at_once > 1 else ""
    return (f"groups of {size} split into groups of {fit} to fit {device}: one trial needs about "
            f"{describe_bytes(trial_bytes)}, {describe_bytes(available_bytes)} available{shared}")


def train_group(configs: Sequence[TrainConfig], dataset: Dataset | None = None,
                available_bytes: int | None = None, groups_at_once: int = 1) -> list[TrainResult]:
    """Train the configs (equal `group_key`) together; results in their order. Configs that cannot
    stack (`group_reason`) train one after another with `train`. A group that would not fit its
    share of its device's memory (`available_bytes`, default: what the device has free now, shared
    equally by `groups_at_once` groups training there at once) trains as consecutive smaller groups,
    with a GroupSplitWarning that says so; every member's result is the same either way."""
    configs = list(configs)
    if not configs:
        return []
    keys = {group_key(config) for config in configs}
    if len(keys) > 1:
        raise ValueError("a group's configs may differ only in " + ", ".join(MEMBER_FIELDS))
    for config in configs:
        check_config(config)
    data = with_validation(dataset if dataset is not None else load_dataset(configs[0].dataset,
                                                                            configs[0].data_dir))
    if len(configs) == 1:
        return [train(configs[0], data)]
    with torch.random.fork_rng(devices=[]):
        model = build_model(configs[0].model, data)
    if group_reason(configs[0], model, data, range(2, len(configs) + 1)) is not None:  # any split too
        return [train(config, data) for config in configs]
    example = data.x_train[:EXAMPLE_SAMPLES]
    one = trial_training_bytes(configs[0], model, example)
    available = available_memory_bytes(configs[0].device) if available_bytes is None else available_bytes
    fit = members_that_fit(one, available, groups_at_once)
    if fit < len(configs):
        warnings.warn(split_note(len(configs), fit, one, available, configs[0].device, groups_at_once),
                      GroupSplitWarning, stacklevel=2)
    results: list[TrainResult] = []
    try:
        with _run_settings(configs[0].threads):
            for start in range(0, len(configs), fit):
                part = configs[start:start + fit]
                results += _train_group(part, data) if len(part) > 1 else [train(part[0], data)]
    except (BackwardUnsplit, MemberStateUnstacked, MemberAxisLost) as found:
        finished = f", and {len(results)} trials its earlier groups finished" if results else ""
        warnings.warn(f"model {configs[0].model!r}: {found}; the group's training so far was thrown away "
                      f"(every member's steps until then{finished}) and its {len(configs)} trials trained "
                      f"one by one from the start", GroupSplitWarning, stacklevel=2)
        return [train(config, data) for config in configs]
    return results


class StackedOptimizer:
    """The members' optimizers over the stacked parameters, plus the post-step rounding of
    `make_optimizer` (stored weights into policy.master_weights, state into policy.optimizer_state)
    per member.

    SGD and Adam(W) take one torch optimizer with a param group per run of consecutive members with
    equal hyperparameters (their updates are elementwise, so a slice of members steps as each would
    alone); SGD's stepped `foreach` (each update operation called once over all the group's tensors:
    on the CPU a loop over the same per-tensor kernels, so the same bits; on CUDA torch's default
    alone), Adam's with the implementation torch takes for a run alone on its device (`foreach`
    None: a loop over the tensors on the CPU, foreach on CUDA); a run of every
    member (seeds alone differ) steps the stacked parameters themselves, with no slice of them or of
    their gradients to make each step. Madam and LNS-Madam take one optimizer
    for the whole group (`Madam.members`): each member's lr, p_scale, g_bound, weight bound, LNS scale
    and table, kept log codes and stochastic-rounding draws are its own, and every operation runs
    once over the stacked tensors.
    """

    def __init__(self, model: nn.Module, configs: Sequence[TrainConfig], policy: QuantPolicy,
                 generators: Sequence[torch.Generator], switch: QuantSwitch) -> None:
        first = configs[0]
        self.name = first.optimizer
        self.params: list[Tensor] = list(model.parameters())
        self.policy = policy
        self.switch = switch
        self.generators = list(generators)
        weights = stored_weights(model)
        self.stored = [] if self.name == "lns-madam" else weights  # LNS-Madam keeps its grid itself
        self.runs: list[tuple[int, int, torch.optim.Optimizer, list[Tensor]]] = []
        if self.name in STACKED_OPTIMIZERS:
            self.runs.append((0, len(configs), self._madam(configs, weights), self.params))
        else:
            runs = self._runs(configs)
            groups = []
            for start, stop in runs:
                config = configs[start]
                whole = stop - start == len(configs)
                views = self.params if whole else [p.detach()[start:stop] for p in self.params]
                lr = DEFAULT_LR[self.name] if config.lr is None else config.lr
                groups.append(plain_param_group(self.name, views, lr, config.momentum, config.weight_decay))
            optimizer = plain_optimizer(self.name, groups, groups[0]["lr"], first.momentum,
                                        first.weight_decay, foreach=True if self.name == "sgd" else None)
            self.runs = [(start, stop, optimizer, group["params"])
                         for (start, stop), group in zip(runs, optimizer.param_groups, strict=True)]
        self.optimizers = list({id(run[2]): run[2] for run in self.runs}.values())
        self.base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in self.optimizers]
        if switch.enabled:
            self.quantize_weights()

    def _madam(self, configs: Sequence[TrainConfig], weights: list[tuple[Tensor, TensorQuant]]
               ) -> torch.optim.Optimizer:
        """Madam or LNS-Madam over the whole group, each member with its own hyperparameters and
        generator (LNS-Madam: weights stored in an LNS format move by whole codes of it)."""
        lns = {p: quant.format for p, quant in weights
               if quant.format is not None} if self.name == "lns-madam" else {}
        return madam_optimizer(
            self.name, self.params, [DEFAULT_LR[self.name] if c.lr is None else c.lr for c in configs],
            [c.p_scale for c in configs], [c.g_bound for c in configs], lns,
            self.policy.master_weights.rounding, MemberGenerators(self.generators), self.switch,
            members=len(configs))

    @staticmethod
    def _runs(configs: Sequence[TrainConfig]) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for g, config in enumerate(configs):
            hyper = (config.lr, config.momentum, config.weight_decay)
            previous = configs[runs[-1][0]] if runs else None
            if previous is not None and (previous.lr, previous.momentum, previous.weight_decay) == hyper:
                runs[-1] = (runs[-1][0], g + 1)
            else:
                runs.append((g, g + 1))
        return runs

    def set_lr_factor(self, factor: float) -> None:
        for optimizer, bases in zip(self.optimizers, self.base_lrs, strict=True):
            for group, base in zip(optimizer.param_groups, bases, strict=True):
                group["lr"] = [lr * factor for lr in base] if isinstance(base, list) else base * factor

    @torch.no_grad()
    def quantize_weights(self) -> None:
        for weight, storage in self.stored:
            weight.copy_(storage.members(weight, MemberGenerators(self.generators)))

    @torch.no_grad()
    def step(self) -> None:
        for start, stop, _, views in self.runs:
            for view, p in zip(views, self.params, strict=True):
                if view is not p:
                    view.grad = None if p.grad is None else p.grad[start:stop]
        for optimizer in self.optimizers:
            optimizer.step()
        self._quantize_after_step()

    def _quantize_after_step(self) -> None:
        if not self.switch.enabled:
            return
        self.quantize_weights()
        state = self.policy.optimizer_state
        if not state.enabled:
            return
        for index in range(len(self.params)):
            for key in STATE_KEYS:
                for start, stop, optimizer, views in self.runs:
                    value = optimizer.state.get(views[index], {}).get(key)
                    if isinstance(value, Tensor) and value.is_floating_point():
                        value.copy_(state.members(value, MemberGenerators(self.generators[start:stop])))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for _, _, _, views in self.runs:
            for view in views:
                view.grad = None


@torch.no_grad()
def evaluate_members(model: nn.Module, members: int, x: Tensor, y: Tensor, batch: int = EVAL_BATCH
                     ) -> list[float]:
    """Each member's accuracy on (x, y), in the batches `dse.train.loop.evaluate` uses alone."""
    model.eval()
    correct = torch.zeros(members, dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        logits = model(chunk.unsqueeze(0).expand(members, *chunk.shape))
        correct += (logits.argmax(-1) == y[start:start + batch]).reshape(members, -1).sum(1)
    model.train()
    return [count / y.numel() for count in correct.tolist()]


MemberLosses = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(logits, targets) -> (each member's loss (G,), the objective: one scalar whose backward gives each
member the gradient its own loss gives it alone)."""


@dataclass
class _GroupSetup:
    """A method applied to a stacked network (what `TrainingSetup` is to one run): the stacked model,
    each member's loss and the group's objective, the step, and the epoch hook."""

    model: nn.Module
    member_losses: MemberLosses
    step: Callable[[], None]
    zero_grad: Callable[[], None]
    on_epoch_start: Callable[[int], None]
    eval_batch: int = EVAL_BATCH


def _cross_entropies(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each member's own cross-entropy as `train` computes it alone (F.cross_entropy: log_softmax,
    then nll_loss's mean), and an objective whose backward gives each member its own gradient, with
    one log_softmax and one nll_loss over all members' rows instead of one of each per member.

    log_softmax is row by row, so every member's rows come out as alone. The objective is the mean
    over all G*N rows times G: nll_loss's backward gives each row's target -(G / (G*N)), which is
    -(1 / N) rounded once, exactly what a member's own mean gives it (`-(1 / N)`; a quotient is
    rounded once, and both exact quotients are 1 / N). The values are not taken from that mean:
    nll_loss sums a member's rows in its own cascade order, so each member's value is nll_loss of its
    own rows of the shared log_softmax (no autograd), the sum `train` takes alone."""
    members, classes = logits.shape[0], logits.shape[-1]
    rows = F.log_softmax(logits.reshape(-1, classes), dim=-1)
    objective = F.nll_loss(rows, targets.reshape(-1)) * members
    with torch.no_grad():
        values = torch.stack([F.nll_loss(own, target) for own, target in zip(
            rows.detach().view(members, -1, classes).unbind(0), targets.reshape(members, -1).unbind(0),
            strict=True)])
    return values, objective


def _quantized_setup(models: list[nn.Module], configs: list[TrainConfig], generators: list[torch.Generator],
                     example: Tensor) -> _GroupSetup:
    """The float-style methods (SGD, Adam(W), Madam, LNS-Madam, the posit recipe) on a stacked network
    (`example`: the samples `train` shows quantize_model, to find the GEMMs called as functions)."""
    first = configs[0]
    policy = QuantPolicy.from_config(first)
    switch = QuantSwitch()
    model = stack_models(models, policy, switch, MemberGenerators(generators), example)
    apart = attributes_apart(model.net, models)
    if apart is not None:
        raise MemberStateUnstacked(apart)
    warmup = first.warmup_epochs
    if warmup:
        switch.enabled = False
    optimizer = StackedOptimizer(model, configs, policy, generators, switch)

    def on_epoch_start(epoch: int) -> None:
        optimizer.set_lr_factor(lr_factor(first, epoch))
        if warmup and epoch == warmup:
            switch.enabled = True
            optimizer.quantize_weights()

    return _GroupSetup(model, _cross_entropies, optimizer.step, optimizer.zero_grad, on_epoch_start)


def _niti_setup(models: list[nn.Module], configs: list[TrainConfig], generators: list[torch.Generator],
                example: Tensor) -> _GroupSetup:
    """NITI on a stacked network (dse/train/niti/stacked.py): each member converted as `niti_setup`
    converts it alone (its initial weights drawn from its generator), then stacked."""
    from dse.train.niti import check_niti, convert_model, niti_copy_bits, niti_mu_for_epoch
    from dse.train.niti.stacked import (
        StackedNitiCrossEntropy,
        StackedNitiOptimizer,
        stack_niti_models,
        stacked_weights,
    )

    first = configs[0]
    bitwidth = check_niti(first)
    for model, generator in zip(models, generators, strict=True):
        convert_model(model, bitwidth, generator)
    model = stack_niti_models(models)
    apart = attributes_apart(model.network, models)  # (as `_quantized_setup` checks its members)
    if apart is not None:
        raise MemberStateUnstacked(apart)
    optimizer = StackedNitiOptimizer(stacked_weights(model), [c.niti_mu for c in configs], bitwidth,
                                     niti_copy_bits(first, bitwidth + 1))

    def on_epoch_start(epoch: int) -> None:
        optimizer.mus = [niti_mu_for_epoch(c.niti_mu, epoch, c.epochs) for c in configs]

    niti_loss = StackedNitiCrossEntropy(bitwidth, MemberGenerators(generators))

    def loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        values = niti_loss(logits, targets)
        return values, values.sum()

    # Evaluated at the training batch size, as `niti_setup` has it.
    return _GroupSetup(model, loss, optimizer.step, optimizer.zero_grad, on_epoch_start, first.batch_size)


def _train_group(configs: list[TrainConfig], data: Dataset) -> list[TrainResult]:
    first = configs[0]
    members = len(configs)
    device = torch.device(first.device)
    models, generators, orders = [], [], []
    for config in configs:  # as `train` does for each alone: global seed for the weights, then generators
        torch.manual_seed(config.seed)
        generators.append(torch.Generator(device=device).manual_seed(config.seed))
        orders.append(torch.Generator().manual_seed(config.seed + 1))
        models.append(build_model(config.model, data).to(device))
    params = sum(p.numel() for p in models[0].parameters())
    setup = (_niti_setup if first.optimizer == "niti" else _quantized_setup)(
        models, configs, generators, data.x_train[:EXAMPLE_SAMPLES].to(device))
    model = setup.model
    del models
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    assert data.x_val is not None and data.y_val is not None
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    started = time.perf_counter()
    losses: list[list[float]] = [[] for _ in configs]
    accuracies: list[list[float]] = [[] for _ in configs]
    val_accuracies: list[list[float]] = [[] for _ in configs]
    iterations: list[list[int]] = [[] for _ in configs]
    diverged = [False] * members
    running = list(range(members))  # members still training
    model.train()
    with (replaying(generators, model),  # a checkpointed block's recomputation draws what its forward drew
          _user_backwards_watched(model, members, first.batch_size) as spies):
        for epoch in range(first.epochs):
            setup.on_epoch_start(epoch)
            permutation = torch.stack([torch.randperm(len(x_train), generator=order)
                                       for order in orders]).to(device)
            tally = EpochTally(training_state(model), members, running, stacked=True,
                               generators=generators)
            for start in range(0, permutation.shape[1], first.batch_size):
                index = permutation[:, start:start + first.batch_size]
                logits = model(x_train[index])
                targets = y_train[index]
                values, objective = setup.member_losses(logits, targets)
                if tally.add(values):
                    break
                for spy in spies.values():
                    spy.rows = index.shape[1]
                objective.backward()
                unsplit = _unsplit_reason(spies)
                if unsplit is not None:  # before the step: the group is dropped, its members train alone
                    raise BackwardUnsplit(unsplit)
                setup.step()
                setup.zero_grad()
            finite = members_finite(list(model.parameters()), members)
            epoch_losses = tally.close()  # (members that diverged get their weights from before it back)
            val = evaluate_members(model, members, x_val, y_val, setup.eval_batch)
            test = evaluate_members(model, members, x_test, y_test, setup.eval_batch)
            for g in list(running):
                if epoch_losses.diverged[g] or not finite[g]:
                    diverged[g] = True
                losses[g].append(math.nan if diverged[g] else epoch_losses.mean(g))
                iterations[g].append(epoch_losses.batches[g])
                val_accuracies[g].append(val[g])
                accuracies[g].append(test[g])
                if diverged[g]:
                    running.remove(g)
            if not running:
                break
    wall = (time.perf_counter() - started) / members
    return [TrainResult(
        test_accuracy=accuracies[g][-1] if accuracies[g] else math.nan,
        final_loss=losses[g][-1] if losses[g] else math.nan,
        diverged=diverged[g],
        epochs_run=len(losses[g]),
        wall_time_s=wall,
        params=params,
        val_accuracy=val_accuracies[g][-1] if val_accuracies[g] else math.nan,
        loss_curve=losses[g],
        accuracy_curve=accuracies[g],
        val_accuracy_curve=val_accuracies[g],
        epoch_iterations=iterations[g],
        config=config.to_dict(),
    ) for g, config in enumerate(configs)]

