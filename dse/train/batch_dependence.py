"""Whether a network's forward depends on its batch's size: a group runs the network's own forward
once on the members' folded batch (G x B rows), so a forward that branches on `len(x)`, `x.shape[0]`
or `x.size(0)` takes there another path than alone, and trains otherwise, silently.

Python's branches are not visible, but what they call is: a copy of the network (so that nothing of
it moves) runs on B rows and on the same rows repeated G times, at every size a run trains and
evaluates with, under a torch-function mode that records every torch call the forward makes (the
function and its arguments: a tensor by its shape and dtype, every other argument by its value). A
group makes the calls of B rows with the batch's sizes scaled by G; anything else (another function,
another count of calls, another scalar, a size that is neither the one alone nor G times it) is a
forward that depends on its batch's size. This compares what the code calls, not what it computes,
so two paths that agree to rounding (`F.silu(h)` and `h * torch.sigmoid(h)`) differ here, and two
sums of the same rows in another order do not. The forwards run on the meta device (shapes, no
values: they cost next to nothing at any size) where they can, on the network's own device where
they read a value (`.item()`, a branch on a tensor). A float read on G x B rows within rounding of
the one read on B rows is taken for it (`READ_ROUNDING`): a group gives each member its bits alone.

An int that a group passes G times as large (a size) is taken for one only if a group of G + 1
passes G + 1 times it too: a branch's int can be G times the one alone by chance (1 alone, 2 in a
group of 2, where 2 is the only count a sweep of two seeds checks).

Not found here: a size scaled by G that is not a size (`h / len(h)`, `torch.arange(len(h))`) looks
like one to the calls; its values differ at any two sizes, so `stack_reason`'s forward of 2 members
finds it. And a call made inside another torch call (torch's own code) is not recorded.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Forward:
    """One size of forward a run makes: `rows` samples, in training mode or evaluation mode."""

    rows: int
    training: bool

    def __str__(self) -> str:
        return f"{'a training' if self.training else 'an evaluation'} batch of {self.rows} rows"


@dataclass(frozen=True)
class _TensorArg:
    shape: tuple[int, ...]
    dtype: torch.dtype


Call = tuple[Any, list[Any]]
"""A torch call as recorded: the function and its arguments' leaves (args, then kwargs by name)."""


SCALAR_READS = frozenset({Tensor.item, Tensor.__float__})
"""The calls that read a tensor's value into a Python float (`float(h.abs().max())`)."""

READ_ROUNDING = 1e-5
"""How far (relative) a value read on G x B rows may lie from the one read on B rows and still be
taken for it: the rows' values differ by rounding alone (a GEMM over G x B rows runs another kernel
than over B: `peak_window_scaled`'s peak 0.6474723219871521 alone, 0.6474723815917969 on 4 rows),
where a group gives each member its bits alone. A statistic of the batch's size (a sum, an unbiased
variance's (n - 1) / n up to n of 10^5) lies farther."""


class _CallRecorder(TorchFunctionMode):
    """Records the torch calls a forward makes (the outermost ones: inside a call the mode is off), and
    the floats it reads from tensors; where `replay` holds those of the forward on B rows, a float read
    within READ_ROUNDING of the one read at the same place there is given that one, so that what the
    forward computes from it (a divisor, a branch) is compared as the group computes it."""

    def __init__(self, replay: Sequence[float] | None = None) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.reads: list[float] = []
        self.replay = replay

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, sorted(kwargs.items())))
        self.calls.append((func, [_described(leaf) for leaf in leaves]))
        result = func(*args, **kwargs)
        if func in SCALAR_READS and isinstance(result, float):
            place = len(self.reads)
            alone = self.replay[place] if self.replay is not None and place < len(self.replay) else None
            if alone is not None and math.isclose(result, alone, rel_tol=READ_ROUNDING):
                result = alone
            self.reads.append(result)
        return result


def _described(leaf: Any) -> Any:
    """An argument as the comparison sees it: a tensor by shape and dtype, a slice by its ends,
    a value of a plain type as itself, anything else by its type."""
    if isinstance(leaf, Tensor):
        return _TensorArg(tuple(leaf.shape), leaf.dtype)
    if isinstance(leaf, slice):
        return ("slice", leaf.start, leaf.stop, leaf.step)
    if leaf is None or isinstance(leaf, (bool, int, float, complex, str, torch.dtype, torch.device,
                                         torch.layout, torch.memory_format, torch.Size)):
        return leaf
    if isinstance(leaf, (tuple, list)):
        return tuple(_described(item) for item in leaf)
    return ("object", type(leaf).__qualname__)


def _scaled(alone: Any, folded: Any, members: int) -> bool:
    """`folded` is what a group passes where one member passes `alone`: equal, or a size G times it."""
    if type(alone) is not type(folded):
        return False
    if isinstance(alone, int) and not isinstance(alone, bool):
        return folded in (alone, alone * members)
    if isinstance(alone, _TensorArg):
        return (alone.dtype == folded.dtype and len(alone.shape) == len(folded.shape)
                and all(_scaled(a, b, members) for a, b in zip(alone.shape, folded.shape, strict=True)))
    if isinstance(alone, tuple):
        return len(alone) == len(folded) and all(_scaled(a, b, members)
                                                 for a, b in zip(alone, folded, strict=True))
    return bool(alone == folded) or alone != alone and folded != folded  # (NaN: equal here)


def _name(func: Any) -> str:
    """A torch function as a user writes it: torch.stack, F.silu, Tensor.view, Tensor.shape."""
    name = getattr(func, "__name__", None) or repr(func)
    for prefix, owner in (("torch.", torch), ("F.", torch.nn.functional), ("Tensor.", torch.Tensor)):
        if getattr(owner, name, None) == func:
            return prefix + name
    holder = getattr(func, "__self__", None)  # a property's getter: Tensor.shape.__get__
    if name == "__get__" and holder is not None and getattr(holder, "__name__", None):
        return f"Tensor.{holder.__name__}"
    return str(getattr(func, "__qualname__", name))


def _difference(alone: list[Call], folded: list[Call], members: int) -> str | None:
    """The first call in which `folded` (G x B rows) is not `alone` (B rows) with sizes scaled by G."""
    for index, ((func, args), (other, other_args)) in enumerate(zip(alone, folded, strict=False)):
        if func != other:
            return f"call {index + 1} is {_name(func)} on B rows, {_name(other)} on G x B"
        if len(args) != len(other_args) or not all(_scaled(a, b, members)
                                                   for a, b in zip(args, other_args, strict=True)):
            return f"call {index + 1}, {_name(func)}, takes other arguments on G x B rows than on B"
    if len(alone) != len(folded):
        return f"it makes {len(alone)} torch calls on B rows, {len(folded)} on G x B"
    return None


@contextmanager
def _generators_kept(devices: list[torch.device]) -> Iterator[None]:
    """torch's (CPU and `devices`), Python's and numpy's global generators as they were, afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _forward(model: nn.Module, inputs: Tensor, training: bool, replay: Sequence[float] | None = None
             ) -> tuple[list[Call], list[float]]:
    """The calls of one forward of a fresh copy of `model` (so that nothing of `model` moves), and the
    floats it read (`_CallRecorder`)."""
    copied = copy.deepcopy(model).train(training)
    torch.manual_seed(0)  # every forward draws the same (a branch on a draw is not one on the size)
    recorder = _CallRecorder(replay)
    with torch.no_grad(), recorder:
        copied(inputs)
    return recorder.calls, recorder.reads


class _Traces:
    """The calls of `model`'s forwards, each size run once: on the meta device while every forward
    runs there (keyed by its rows: values do not matter), on the network's own device from the first
    that does not (a forward that reads a value, `.item()` or a branch on a tensor; keyed by the
    member's rows and the repetitions, which fix the values)."""

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        self.model, self.example = model, example
        try:
            self.meta: nn.Module | None = copy.deepcopy(model).to("meta")
        except Exception:
            self.meta = None
        self.cache: dict[tuple[Any, ...], tuple[list[Call], list[float]]] = {}

    def pair(self, forward: Forward, members: int) -> tuple[list[Call], list[Call]]:
        """The calls on `forward.rows` rows and on them repeated `members` times, on one device."""
        if self.meta is not None:
            try:
                return self._calls(forward, 1, self.meta), self._calls(forward, members, self.meta)
            except Exception:
                self.meta = None
        return self._calls(forward, 1, self.model), self._calls(forward, members, self.model)

    def _calls(self, forward: Forward, members: int, model: nn.Module) -> list[Call]:
        on_meta = model is self.meta
        key = (forward.rows * members, forward.training) if on_meta else (forward, members)
        if key not in self.cache:
            inputs = _repeated(_rows(self.example, forward.rows), members)
            alone = self.cache.get((forward, 1)) if members > 1 and not on_meta else None
            self.cache[key] = _forward(model, inputs.to("meta") if on_meta else inputs, forward.training,
                                       None if alone is None else alone[1])
        return self.cache[key][0]


def _rows(example: Tensor, rows: int) -> Tensor:
    """`rows` samples: `example`'s, repeated."""
    return _repeated(example, -(-rows // len(example)))[:rows]


def _repeated(rows: Tensor, times: int) -> Tensor:
    """`rows` `times` times over, one block after another (a group's folded batch of equal members)."""
    return rows.repeat(times, *[1] * (rows.dim() - 1))


def batch_size_reason(model: nn.Module, example: Tensor, forwards: Iterable[Forward],
                      members: Iterable[int]) -> str | None:
    """Why a group of `members` (each count a group will have) would run `model`'s forward otherwise
    than each member alone, at the sizes of `forwards` (None: it would not; module docstring).
    `example` holds a few samples, repeated to each size. Nothing of `model` and no global random
    generator moves."""
    counts = sorted({g for g in members if g > 1})
    if not counts:
        return None
    devices = [example.device] if example.is_cuda else []
    with _generators_kept(devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traces = _Traces(model, example)
        for forward in dict.fromkeys(forwards):
            for g in counts:
                reason = _pair_reason(traces, forward, g)
                if reason is None and _scales_an_int(*traces.pair(forward, g)):
                    # a branch's int may be G times the one alone by chance (1 alone, 2 in a group of
                    # 2); a size is G' times it at every count G': a second count tells them apart
                    reason = _pair_reason(traces, forward, g + 1)
                    if reason is not None:
                        reason += f"; a group of {g} passes {g} times an int alone passes, not a size"
                if reason is not None:
                    return reason
    return None


def _pair_reason(traces: _Traces, forward: Forward, members: int) -> str | None:
    try:
        alone, folded = traces.pair(forward, members)
    except Exception as error:  # a forward that fails at one size: other paths at other sizes
        return _found(f"its forward fails on one of them: {type(error).__name__}", forward, members)
    difference = _difference(alone, folded, members)
    return None if difference is None else _found(difference, forward, members)


def _ints(described: Any) -> Iterator[int]:
    """The plain ints of an argument as `_described` gives it (not a tensor's shape)."""
    if isinstance(described, int) and not isinstance(described, bool):
        yield described
    elif isinstance(described, tuple):
        for item in described:
            yield from _ints(item)


def _scales_an_int(alone: list[Call], folded: list[Call]) -> bool:
    """Whether a call of `folded` passes another int than its call of `alone` (calls that match)."""
    return any(a != b for (_, args), (_, others) in zip(alone, folded, strict=True)
               for arg, other in zip(args, others, strict=True)
               for a, b in zip(_ints(arg), _ints(other), strict=True))


def _found(difference: str, forward: Forward, members: int) -> str:
    return (f"its forward depends on its batch's size ({difference}; {forward} alone, "
            f"{forward.rows * members} rows in a group of {members})")


def forwards_of(batch_size: int, eval_batch: int, train_rows: int, eval_rows: Sequence[int]) -> list[Forward]:
    """Every size of forward a run trains and evaluates with: the training batch and the epoch's last
    partial one (training mode), each evaluation set's batch and its last partial one (evaluation
    mode)."""
    sizes = [Forward(min(batch_size, train_rows), True)]
    if train_rows > batch_size and train_rows % batch_size:
        sizes.append(Forward(train_rows % batch_size, True))
    for rows in eval_rows:
        sizes.append(Forward(min(eval_batch, rows), False))
        if rows > eval_batch and rows % eval_batch:
            sizes.append(Forward(rows % eval_batch, False))
    return [size for size in dict.fromkeys(sizes) if size.rows > 0]
