"""Activation checkpointing (dse/train/recompute.py) as a user of `dse train` sees it: a checkpointed
network trains bit for bit as without checkpointing, stochastic rounding included, and a torch whose
checkpoint no longer recomputes through what dse replaces is refused with a clear error."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from support.member_checks import assert_each_member_as_alone
from torch import Tensor, nn

from dse.data import load_dataset
from dse.train import TrainConfig, recompute, train
from dse.train.grouped import backward_reason, train_group
from dse.train.recompute import (
    TORCH_CHECKPOINT_FUNCTION,
    TORCH_REENTRANT_FORWARD,
    CheckpointsNotFollowed,
    check_checkpoints_followed,
    follow_checkpoints,
)

USERS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"


@pytest.fixture(scope="module")
def small_digits() -> object:
    data = load_dataset("digits")
    return dataclasses.replace(data, x_train=data.x_train[:100], y_train=data.y_train[:100],
                               x_val=data.x_val[:30], y_val=data.y_val[:30], x_test=data.x_test[:30],
                               y_test=data.y_test[:30])


def _same(a: object, b: object) -> bool:
    def seen(r: object) -> str:
        return repr({k: v for k, v in dataclasses.asdict(r).items()  # type: ignore[call-overload]
                     if k not in ("wall_time_s", "config")})
    return seen(a) == seen(b)


@pytest.mark.parametrize("network", ["checkpointed", "checkpointed_reentrant", "checkpointed_layer",
                                     "checkpointed_layer_reentrant"])
def test_a_checkpointed_network_trains_with_stochastic_rounding_as_without_checkpointing(
        network: str, small_digits: object) -> None:
    """Before recompute.py replayed the run's generator (torch 2.13, this setup), the recomputation
    drew new rounding numbers: the functional-GEMM block's final loss 2.3070564 against 2.3069679
    without checkpointing (test accuracy 1/30 against 2/30), the nn.Linear block's 2.3000735 against
    2.3000925, reentrant and non-reentrant alike; nearest rounding was already equal."""
    plain = network.replace("_reentrant", "") + "_plain"
    base = TrainConfig(dataset="digits", optimizer="sgd", format="int8", rounding="stochastic", epochs=1,
                       batch_size=50, threads=1, lr=0.05, seed=3)
    checkpointed = train(base.replace(model=f"{USERS}:{network}"), small_digits)  # type: ignore[arg-type]
    without = train(base.replace(model=f"{USERS}:{plain}"), small_digits)  # type: ignore[arg-type]
    assert _same(checkpointed, without), (checkpointed, without)


def test_a_checkpointed_group_trains_with_stochastic_rounding_as_each_member_without_checkpointing(
        small_digits: object) -> None:
    base = TrainConfig(dataset="digits", optimizer="sgd", format="int8", rounding="stochastic", epochs=1,
                       batch_size=50, threads=1, lr=0.05)
    together = train_group([base.replace(model=f"{USERS}:checkpointed", seed=s) for s in (3, 4)],
                           small_digits)  # type: ignore[arg-type]
    for member, seed in zip(together, (3, 4), strict=True):
        alone = train(base.replace(model=f"{USERS}:checkpointed_plain", seed=seed), small_digits)  # type: ignore[arg-type]
        assert _same(member, alone), (seed, member, alone)


def test_this_torchs_checkpoint_recomputes_through_what_dse_replaces() -> None:
    """What fails first on a torch upgrade that changes how `checkpoint` finds its parts."""
    follow_checkpoints()
    check_checkpoints_followed()


def test_a_torch_whose_checkpoint_does_not_look_up_the_replaced_parts_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As a torch would be whose reentrant checkpoint ran its forward by another name: the check
    raises, naming the torch version and the form, instead of training with other bits."""
    follow_checkpoints()
    monkeypatch.setattr(TORCH_CHECKPOINT_FUNCTION, "forward", staticmethod(TORCH_REENTRANT_FORWARD))
    with pytest.raises(CheckpointsNotFollowed, match=rf"torch {re.escape(torch.__version__)}.*\(reentrant\)"):
        check_checkpoints_followed()


class _BoundBeforeDse(nn.Module):
    """Reentrant checkpointing by torch's own CheckpointFunction, as a user's file that ran `from
    torch.utils.checkpoint import CheckpointFunction` before dse replaced it calls it: its
    recomputation runs outside the member mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(64, 37), nn.Linear(37, 10)

    def forward(self, x: Tensor) -> Tensor:
        def block(h: Tensor) -> Tensor:
            return F.silu(h) * torch.sigmoid(h)

        return self.head(TORCH_CHECKPOINT_FUNCTION.apply(block, True, self.a(x)))


@pytest.mark.parametrize("members, rows, threads", [(2, 50, 1), (3, 300, 2)],
                         ids=["1-thread", "2-threads-above-grain"])
def test_torchs_checkpoint_function_bound_before_dse_gives_each_member_its_bits_alone(
        members: int, rows: int, threads: int) -> None:
    """When recompute.py replaced the module's name for the class (a subclass of torch's), a name bound
    before it ran torch's recomputation outside the member mode: backward_reason let the network stack,
    and the group gave members other gradients than alone (torch 2.13, 2 members of 50 rows: member
    1's input gradient and a.weight's in 1 element each; 3 of 300 at 2 threads: member 0's a.weight
    in 2, member 1's input gradient in 4). torch's own class recomputes under the modes now."""
    torch.manual_seed(0)
    nets = [_BoundBeforeDse() for _ in range(members)]
    assert backward_reason(nets[0], torch.randn(2, 64)) is None
    assert_each_member_as_alone(nets, rows, threads)


def test_a_torch_whose_checkpoint_parts_take_other_arguments_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As a torch would be whose non-reentrant generator took other arguments: the same clear error,
    not the TypeError from inside torch."""
    follow_checkpoints()

    def generator(fn: object, *args: object, **kwargs: object) -> object:
        raise TypeError("takes 3 positional arguments")

    monkeypatch.setattr(recompute, "_TORCH_WITHOUT_REENTRANT", generator)
    with pytest.raises(CheckpointsNotFollowed, match=r"\(non-reentrant\) fails.*TypeError: takes 3"):
        check_checkpoints_followed()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("preserve", [True, False], ids=["preserve_rng_state", "not-preserved"])
def test_a_recomputation_replays_the_runs_generators_unless_rng_state_is_not_preserved(
        reentrant: bool, preserve: bool) -> None:
    """The recomputation draws what the forward drew, and the generator ends where it would have
    without checkpointing; `preserve_rng_state=False` opts out, as it does for torch's generators."""
    generator = torch.Generator().manual_seed(0)
    draws: list[Tensor] = []

    def block(t: Tensor) -> Tensor:
        draws.append(torch.rand(3, generator=generator))
        return t * t

    with recompute.replaying([generator]):
        x = torch.ones(3, requires_grad=True)
        y = torch_checkpoint.checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=preserve)
        after_forward = torch.rand(2, generator=generator)
        y.sum().backward()
        after_backward = torch.rand(2, generator=generator)
    without = torch.Generator().manual_seed(0)
    assert torch.equal(draws[0], torch.rand(3, generator=without))
    assert torch.equal(after_forward, torch.rand(2, generator=without))
    assert len(draws) == 2
    assert torch.equal(draws[1], draws[0]) == preserve
    if preserve:
        assert torch.equal(after_backward, torch.rand(2, generator=without))


def test_the_check_runs_on_the_cpu_whatever_the_default_device() -> None:
    """Under a default-device context (here meta) the check's tensors were made on that device and it
    raised CheckpointsNotFollowed for a torch that follows checkpoints ("Tensor.item() cannot be
    called on meta tensors")."""
    with torch.device("meta"):
        check_checkpoints_followed()


@pytest.fixture
def torch_not_following(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on a torch whose checkpoint does not look up what recompute.py replaces: the
    replacement has no effect (torch's own parts stay), and the once-per-process check is not yet done."""
    monkeypatch.setattr(recompute, "_replace_torchs_parts", lambda: None)
    monkeypatch.setattr(TORCH_CHECKPOINT_FUNCTION, "forward", staticmethod(TORCH_REENTRANT_FORWARD))
    monkeypatch.setattr(torch_checkpoint, "_checkpoint_without_reentrant_generator",
                        recompute._TORCH_WITHOUT_REENTRANT)
    monkeypatch.setattr(recompute, "_FOLLOWED", [])


def _one_error_line(result: object) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return lines[0]


_TRAIN = ["train", "--dataset", "digits", "--format", "int8", "--epochs", "1", "--batch-size", "200",
          "--threads", "1", "--json"]


def test_on_a_torch_whose_checkpoint_does_not_follow_a_network_that_never_checkpoints_trains(
        torch_not_following: None) -> None:
    """Before, every run refused to start (CheckpointsNotFollowed, a traceback from `dse train`), even
    for a network that never checkpoints; now only a run whose network checkpoints is refused."""
    from typer.testing import CliRunner

    from dse.cli import app

    result = CliRunner().invoke(app, [*_TRAIN, "--model", f"{USERS}:checkpointed_plain"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert not recompute._FOLLOWED  # nothing checkpointed: the check never ran


@pytest.mark.parametrize(("network", "form"), [("checkpointed", "reentrant"),
                                               ("checkpointed_reentrant", "reentrant"),
                                               ("checkpointed_sequential", "reentrant")])
def test_on_a_torch_whose_checkpoint_does_not_follow_dse_train_of_a_checkpointing_network_is_one_line(
        torch_not_following: None, network: str, form: str) -> None:
    """One line naming the torch version and the form, exit 2, no traceback (the check tries the
    reentrant form first: it is the one this simulated torch fails first, whatever the network calls)."""
    from typer.testing import CliRunner

    from dse.cli import app

    line = _one_error_line(CliRunner().invoke(app, [*_TRAIN, "--model", f"{USERS}:{network}"]))
    assert f"torch {torch.__version__}" in line and f"({form})" in line, line


class _Composable(nn.Module):
    """A block checkpointed by torch.distributed's composable `checkpoint(module)` (by hooks: no call
    of torch.utils.checkpoint's entry points)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.distributed._composable import checkpoint as composable

        self.a, self.head = nn.Linear(64, 37), nn.Linear(37, 10)
        self.middle = composable(nn.Sequential(nn.Linear(37, 37), nn.SiLU()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.middle(self.a(x)))


def test_on_a_torch_whose_checkpoint_does_not_follow_a_composable_checkpoint_is_refused(
        torch_not_following: None, small_digits: object) -> None:
    config = TrainConfig(dataset="digits", format="int8", epochs=1, batch_size=50, threads=1)
    with pytest.raises(CheckpointsNotFollowed, match=r"\(reentrant\)"):
        train(config, small_digits, model=lambda shape, classes: _Composable())  # type: ignore[arg-type]


@pytest.mark.parametrize("order", [("plain", "ck"), ("ck", "plain")])
def test_on_a_torch_whose_checkpoint_does_not_follow_a_sweep_stores_what_finished_and_names_the_trial(
        torch_not_following: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        order: tuple[str, str]) -> None:
    """The plain network's trials are stored, whichever runs first; the checkpointing one ends the
    sweep with one line naming its trial (not stored as a failed trial, which a resume would not run
    again). Before, the sweep stopped at the checkpointing trial, so that a plain trial after it never
    ran, on any resume."""
    from typer.testing import CliRunner

    import dse.sweep.executors
    import dse.sweep.runner
    from dse.cli import app
    from dse.sweep import expand, parse_config

    monkeypatch.setattr(dse.sweep.runner, "make_executor", lambda sweep: dse.sweep.executors.InlineExecutor())
    monkeypatch.setattr(dse.sweep.runner, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: None)
    config = tmp_path / "s.yaml"
    networks = {"plain": "checkpointed_plain", "ck": "checkpointed"}
    tasks = "".join(f"  - {{name: {task}, model: '{USERS}:{networks[task]}', dataset: digits}}\n"
                    for task in order)
    config.write_text(f"name: ck\nseeds: [0]\ntasks:\n{tasks}energy: {{workloads: [proxy]}}\n"
                      f"trials: [{{format: int8, epochs: 1}}]\noutput: {tmp_path / 'out'}\n")
    line = _one_error_line(CliRunner().invoke(app, ["sweep", str(config), "-q"]))
    trials = {t.task: t.trial_id for t in expand(parse_config(config.read_text(), "s.yaml"))}
    assert f"trial {trials['ck']} (ck: " in line and "CheckpointsNotFollowed" in line, line
    from support.stores import stored_trial_ids

    assert set(stored_trial_ids(tmp_path / "out")) == {trials["plain"]}



_EARLY_BOUND_NETWORK = """
from torch import nn

from dse.train.recompute import TORCH_CHECKPOINT as checkpoint  # torch's own, as bound before dse wrapped it


class EarlyBound(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(64, 37), nn.Linear(37, classes)
        self.block = nn.Sequential(nn.Linear(37, 37), nn.SiLU())

    def forward(self, x):
        return self.head(checkpoint(self.block, self.a(x), use_reentrant=False))


def early_bound(shape, classes):
    return EarlyBound(classes)
"""


@pytest.mark.parametrize("grouped", [False, True])
def test_on_a_torch_whose_checkpoint_does_not_follow_a_network_bound_to_torchs_own_checkpoint_is_refused(
        torch_not_following: None, small_digits: object, tmp_path: Path, grouped: bool) -> None:
    """A script that imports its network's file before dse holds torch's own `checkpoint` (bound by
    `from torch.utils.checkpoint import checkpoint` before dse wrapped it), whose calls pass by the
    wrapper: before, such a run trained on that torch without the check, with other bits."""
    (tmp_path / "early.py").write_text(_EARLY_BOUND_NETWORK)
    config = TrainConfig(dataset="digits", model=f"{tmp_path / 'early.py'}:early_bound", format="int8",
                         epochs=1, batch_size=50, threads=1)
    with pytest.raises(CheckpointsNotFollowed, match=r"\(reentrant\)"):
        if grouped:
            train_group([config, dataclasses.replace(config, seed=1)], small_digits)  # type: ignore[arg-type]
        else:
            train(config, small_digits)  # type: ignore[arg-type]
