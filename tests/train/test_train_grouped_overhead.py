"""What a grouped step does beyond its members' own arithmetic (dse/train/grouped.py, stacked.py): a
group whose members differ only in their seed steps its optimizer over the stacked parameters
themselves, no slice of them made per step, and each member still equals its run alone bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig
from dse.train.grouped import StackedOptimizer, _quantized_setup
from dse.train.loop import EXAMPLE_SAMPLES, _run_settings

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64)
ONE_RUN_CASES: list[dict[str, Any]] = [
    {"momentum": 0.9, "weight_decay": 1e-3},  # fp32 SGD with momentum and weight decay
    {"format": "int8", "optimizer": "adam", "optimizer_state": "bf16", "master_weights": "fixed(16,8)"},
]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _group(configs: list[TrainConfig]) -> Any:
    data = load_dataset("digits")
    models = []
    for config in configs:
        torch.manual_seed(config.seed)
        models.append(build_model(config.model, data))
    setup = _quantized_setup(models, configs, [torch.Generator().manual_seed(c.seed) for c in configs],
                             data.x_train[:EXAMPLE_SAMPLES])
    return setup, data


@pytest.mark.parametrize("fields", ONE_RUN_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_group_of_one_run_steps_the_stacked_parameters_with_no_slice_per_step(
        fields: dict[str, Any]) -> None:
    configs = [BASE.replace(seed=seed, **fields) for seed in range(3)]
    with _run_settings(1):
        setup, data = _group(configs)
        setup.on_epoch_start(0)
        index = torch.arange(BASE.batch_size).expand(len(configs), -1)
        stacked = list(setup.model.parameters())
        for _ in range(2):  # the optimizer's state exists from its first step on
            setup.member_losses(setup.model(data.x_train[index]), data.y_train[index])[1].backward()
            with _Ops() as ops:
                setup.step()
            setup.zero_grad()
    optimizer = setup.step.__self__
    assert len(optimizer.runs) == 1
    stepped = [p for group in optimizer.runs[0][2].param_groups for p in group["params"]]
    assert [id(p) for p in stepped] == [id(p) for p in stacked]
    assert not [name for name in ops.names if "slice" in name], ops.names


def test_a_group_of_several_runs_still_steps_each_run_on_its_members_slices() -> None:
    configs = [BASE.replace(seed=0), BASE.replace(seed=1, lr=0.1), BASE.replace(seed=2, lr=0.1)]
    setup, _ = _group(configs)
    optimizer = setup.step.__self__
    assert [(start, stop) for start, stop, _, _ in optimizer.runs] == [(0, 1), (1, 3)]
    for start, stop, _, views in optimizer.runs:
        for view, p in zip(views, setup.model.parameters(), strict=True):
            assert view.shape[0] == stop - start and view.data_ptr() == p[start].data_ptr()


@pytest.mark.parametrize("fields", ONE_RUN_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_group_of_one_run_equals_each_member_alone_bit_for_bit(
        fields: dict[str, Any], digits: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    results = stacked_same_as_alone([BASE.replace(seed=seed, **fields) for seed in range(3)], digits)
    assert len({r["final_loss"] for r in results}) == 3  # the members are distinct runs


def _stepped(configs: list[TrainConfig], grads: list[list[torch.Tensor]], runs_per_member: bool,
             monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The stacked parameters after stepping `grads` (one list per step), and each member's optimizer
    state tensors; `runs_per_member`: every member in a run of its own, on its slices (the path a
    group whose members' hyperparameters all differ takes, and every run took before f04c273)."""
    with monkeypatch.context() as patch:
        if runs_per_member:
            patch.setattr(StackedOptimizer, "_runs",
                          staticmethod(lambda c: [(g, g + 1) for g in range(len(c))]))
        setup, _ = _group(configs)
    setup.on_epoch_start(0)
    params = list(setup.model.parameters())
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad.clone()
        setup.step()
        setup.zero_grad()
    optimizer = setup.step.__self__
    states = []
    for g in range(len(configs)):
        start, _, torch_optimizer, views = next(run for run in optimizer.runs if run[0] <= g < run[1])
        states.append([value[g - start] if value.dim() else value
                       for view in views for value in torch_optimizer.state[view].values()])
    return [p.detach() for p in params], states


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@settings(max_examples=12, deadline=None)
@given(optimizer=st.sampled_from(["sgd", "adam", "adamw"]), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-3]), format=st.sampled_from([None, "int8", "bf16"]),
       master_weights=st.sampled_from([True, False, "fixed(16,8)"]),
       optimizer_state=st.sampled_from([None, "bf16"]), lr=st.sampled_from([None, 0.5]),
       broken=st.sampled_from([None, 0, 2]), seed=st.integers(0, 2**16))
def test_a_run_of_every_member_steps_each_member_as_a_run_of_its_own_would(
        optimizer: str, momentum: float, weight_decay: float, format: str | None, master_weights: bool | str,
        optimizer_state: str | None, lr: float | None, broken: int | None, seed: int) -> None:
    """Stepping the stacked parameters themselves (one run of every member) leaves each member's
    weights and optimizer state bit for bit where stepping its own slices leaves them, including a
    member whose gradient turns NaN and inf (a diverging member: the tally gives it its weights back,
    and the others must not see it)."""
    configs = [BASE.replace(seed=g, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                            format=format, master_weights=master_weights, optimizer_state=optimizer_state,
                            lr=lr) for g in range(3)]
    shapes = [p.shape for p in _group(configs[:1] * 2)[0].model.parameters()]
    shapes = [(3, *shape[1:]) for shape in shapes]
    generator = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    if broken is not None:
        grads[1][0][broken].fill_(float("nan"))
        grads[2][-1][broken].fill_(float("inf"))
    with pytest.MonkeyPatch.context() as monkeypatch, _run_settings(1):
        whole, whole_states = _stepped(configs, grads, False, monkeypatch)
        sliced, sliced_states = _stepped(configs, grads, True, monkeypatch)
    for p, q in zip(whole, sliced, strict=True):
        assert torch.equal(_bits(p), _bits(q))
    for own, theirs in zip(whole_states, sliced_states, strict=True):
        assert len(own) == len(theirs)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(own, theirs, strict=True))


@settings(max_examples=12, deadline=None)
@given(optimizer=st.sampled_from(["sgd", "adam", "adamw"]), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-3]),
       lrs=st.lists(st.sampled_from([0.01, 0.05, 0.5]), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_a_group_of_several_runs_steps_each_member_as_its_own_optimizer_alone_would(
        optimizer: str, momentum: float, weight_decay: float, lrs: list[float], seed: int) -> None:
    """A group whose members differ in their learning rate steps all its runs in one torch optimizer,
    one param group a run, each update operation once over all the group's tensors (`foreach`): each
    member's weights and state are bit for bit what its own optimizer alone leaves on fresh tensors
    (torch's per-tensor loop, as `dse train` steps it)."""
    from dse.train.optim import plain_optimizer

    configs = [BASE.replace(seed=g, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lr=lr)
               for g, lr in enumerate(lrs)]
    with _run_settings(1):
        setup, _ = _group(configs)
        setup.on_epoch_start(0)
        params = list(setup.model.parameters())
        alone = [[p.detach()[g].clone().requires_grad_() for p in params] for g in range(len(configs))]
        own = [plain_optimizer(optimizer, tensors, lr, momentum, weight_decay)
               for tensors, lr in zip(alone, lrs, strict=True)]
        assert len({id(run[2]) for run in setup.step.__self__.runs}) == 1
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=generator) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            setup.step()
            setup.zero_grad()
            for g, (tensors, member_optimizer) in enumerate(zip(alone, own, strict=True)):
                for t, grad in zip(tensors, grads, strict=True):
                    t.grad = grad[g].clone()
                member_optimizer.step()
    stepped = setup.step.__self__
    for g, (tensors, member_optimizer) in enumerate(zip(alone, own, strict=True)):
        start, _, torch_optimizer, views = next(run for run in stepped.runs if run[0] <= g < run[1])
        for p, t in zip(params, tensors, strict=True):
            assert torch.equal(_bits(p.detach()[g]), _bits(t.detach()))
        for view, t in zip(views, tensors, strict=True):
            theirs, mine = torch_optimizer.state[view], member_optimizer.state[t]
            assert theirs.keys() == mine.keys()
            for key, value in mine.items():
                member = theirs[key][g - start] if value.dim() else theirs[key]
                assert torch.equal(_bits(member), _bits(value))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_a_groups_adam_steps_with_the_implementation_torch_takes_for_a_run_alone_on_a_device(
        optimizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch steps a run alone with its foreach Adam (its default for CUDA tensors, made here the
    default for CPU ones), a group of several runs steps with it too, and where torch loops over the
    tensors alone, the group loops: the group's members get the kernels, so the bits, of `dse train`
    on every device (SGD, whose CPU foreach is a loop over the per-tensor kernels, steps foreach
    everywhere: the test above)."""
    import torch.optim.adam as adam_module

    from dse.train.optim import plain_optimizer

    taken: list[str] = []

    def spy(name: str) -> Callable[..., Any]:
        original = getattr(adam_module, name)

        def taking(*args: Any, **kwargs: Any) -> Any:
            taken.append(name)
            return original(*args, **kwargs)
        return taking

    for name in ("_multi_tensor_adam", "_single_tensor_adam"):
        monkeypatch.setattr(adam_module, name, spy(name))
    configs = [BASE.replace(seed=g, optimizer=optimizer, lr=lr) for g, lr in enumerate([1e-3, 2e-3])]
    for device_default in (False, True):
        monkeypatch.setattr(adam_module, "_default_to_fused_or_foreach",
                            lambda *args, _foreach=device_default, **kwargs: (False, _foreach))
        with _run_settings(1):
            setup, _ = _group(configs)
            setup.on_epoch_start(0)
            params = list(setup.model.parameters())
            alone = plain_optimizer(optimizer, [p.detach()[0].clone().requires_grad_() for p in params],
                                    1e-3, 0.0, 0.0)
            taken.clear()
            for p in params:
                p.grad = torch.ones_like(p)
            setup.step()
            grouped = list(taken)
            taken.clear()
            for t in alone.param_groups[0]["params"]:
                t.grad = torch.ones_like(t)
            alone.step()
        expected = "_multi_tensor_adam" if device_default else "_single_tensor_adam"
        assert set(grouped) == set(taken) == {expected}


def test_a_diverging_member_of_a_group_of_one_run_equals_its_run_alone(
        digits: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    """fp16 at lr 25: seed 0 overflows in the first epoch, seeds 1 and 2 do not; all three share one
    run of the optimizer, which steps the diverged member's weights along with the others'."""
    base = BASE.replace(format="fp16", lr=25.0, epochs=2)
    results = stacked_same_as_alone([base.replace(seed=seed) for seed in range(3)], digits)
    assert [r["diverged"] for r in results] == [True, False, False]


class _CopiesFrom(TorchDispatchMode):
    """How many `copy_` calls read from memory starting at `address`."""

    def __init__(self, address: int) -> None:
        super().__init__()
        self.address, self.count = address, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.copy_.default and args[1].data_ptr() == self.address:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _at_shift(values: torch.Tensor, shift: int) -> torch.Tensor:
    """`values` copied into a fresh tensor that starts `shift` elements into its storage (off the
    allocator's 64-byte alignment where shift is not a multiple of 16 float32s)."""
    storage = torch.empty(shift + values.numel(), dtype=values.dtype)
    return storage[shift:].view(values.shape).copy_(values)


@settings(max_examples=60, deadline=None)
@given(members=st.integers(1, 5), rows=st.integers(1, 40), columns=st.integers(1, 40),
       shift=st.integers(0, 15))
def test_the_transpose_of_aligned_errors_is_the_aligned_transpose_of_the_errors(
        members: int, rows: int, columns: int, shift: int) -> None:
    """What lets a stacked Linear's backward copy its errors once: for a contiguous (G, rows, columns)
    gradient, at any shape (1s included) and start, the transpose of `at_alone_alignment(errors)` has
    the shape, strides and address modulo the alignment that `at_alone_alignment` of the transposed
    errors has, which the weight gradient's GEMM took before."""
    from dse.train.batched_sums import alignment_bytes, at_alone_alignment

    errors = _at_shift(torch.randn(members, rows, columns), shift)
    once = at_alone_alignment(errors).transpose(1, 2)
    apart = at_alone_alignment(errors.transpose(1, 2))
    align = alignment_bytes(errors)
    assert (once.shape, once.stride(), once.data_ptr() % align) == (
        apart.shape, apart.stride(), apart.data_ptr() % align)
    assert torch.equal(once, apart)


@settings(max_examples=20, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(1, 40), features_in=st.integers(1, 40),
       features_out=st.integers(1, 12), shift=st.sampled_from([0, 0, 2, 5]), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_a_stacked_linears_backward_copies_its_errors_to_alone_alignment_at_most_once(
        members: int, rows: int, features_in: int, features_out: int, shift: int, threads: int,
        seed: int) -> None:
    """Both backward GEMMs of a stacked Linear read the output's gradient: where a member's block of it
    lies off alone's alignment it is copied there once (the weight gradient's GEMM takes that copy's
    transpose), not once per GEMM, and each member's input and weight gradients are still its own
    mm's alone, on fresh tensors at the gradient's start modulo the alignment, bit for bit, at 1 and
    2 threads."""
    from dse.train.batched_sums import alignment_bytes
    from dse.train.stacked import StackedLinearOp

    generator = torch.Generator().manual_seed(seed)
    dy = _at_shift(torch.randn(members, rows, features_out, generator=generator), shift)
    x = torch.randn(members, rows, features_in, generator=generator)
    weight = torch.randn(members, features_out, features_in, generator=generator)
    with _run_settings(threads), _CopiesFrom(dy.data_ptr()) as copies:
        dx, dw = StackedLinearOp().backward(dy, x, weight, True, True)
    off = rows * features_out * dy.element_size() % alignment_bytes(dy) != 0
    assert copies.count == (1 if off else 0)
    assert dx is not None and dw is not None
    with _run_settings(threads):
        for g in range(members):
            own_dy, own_x, own_w = _at_shift(dy[g], shift), x[g].clone(), weight[g].clone()
            assert torch.equal(_bits(dx[g]), _bits(own_dy @ own_w))
            assert torch.equal(_bits(dw[g]), _bits(own_dy.t() @ own_x))
