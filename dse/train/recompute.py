"""Activation checkpointing under dse's torch-function modes: a checkpointed block recomputed in the
backward runs under the modes of ours its forward ran under, with their state as it was then.

dse enters its torch-function modes (`MemberKernelMode`, the functional-GEMM mode) by a network's
forward hooks, so they are on the stack while the forward runs and off it when `backward()` runs.
`torch.utils.checkpoint.checkpoint` runs a block in the forward and again in the backward (the
reentrant form re-runs the function in `CheckpointFunction.backward`; the non-reentrant form in the
unpack hook of a saved tensor); without the modes the recomputation computes other tensors than the
forward did (a group's activations over the whole folded batch, a functional GEMM unquantized) and
saves another number of them (non-reentrant: CheckpointError). So `follow_checkpoints` wraps the
function both forms recompute (and torch.distributed's composable `checkpoint(module)`, which drives
the non-reentrant generator itself), once per process, when a mode of ours is first installed: where
a mode of ours is on the stack when `checkpoint` is called (`checkpoint_sequential` calls it too),
the recomputation runs with those modes pushed above the backward's stack in their order, each with
the state it had then (`RecomputedMode.recompute_state`); where none is, torch's function runs as it
is.

What this does not reach - a recomputation by other code than these functions of torch's, a
user's `autograd.Function` whose backward calls a position-dependent function (the autograd engine
runs every backward with no torch-function mode) - the grouped trainer finds before training
(dse/train/grouped.py, `backward_reason`) and trains one by one, saying why.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.overrides import TorchFunctionMode


def function_modes() -> list[Any]:
    """The torch-function mode stack, bottom first."""
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def set_function_modes(modes: list[Any]) -> None:
    """Make the torch-function mode stack `modes`, bottom first."""
    while torch._C._len_torch_function_stack():
        torch._C._pop_torch_function_stack()
    for mode in modes:
        torch._C._push_on_torch_function_stack(mode)


class RecomputedMode(TorchFunctionMode):
    """A torch-function mode of ours: a checkpointed block's recomputation runs under it where its
    forward did."""

    def recompute_state(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        """Called where a block is checkpointed: a factory of contexts that give the mode, for one
        recomputation, the state it has now (default: it keeps none)."""
        return contextlib.nullcontext


def under_forward_modes(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, run later (a recomputation) under the RecomputedModes on the stack now, in their
    order above the modes of the time it runs, each with its state of now; `function` itself where
    none is on the stack."""
    modes = [mode for mode in function_modes() if isinstance(mode, RecomputedMode)]
    if not modes:
        return function
    states = [mode.recompute_state() for mode in modes]

    @functools.wraps(function)
    def recompute(*args: Any, **kwargs: Any) -> Any:
        before = function_modes()
        with contextlib.ExitStack() as contexts:
            for state in states:
                contexts.enter_context(state())
            set_function_modes([mode for mode in before if not isinstance(mode, RecomputedMode)] + modes)
            try:
                return function(*args, **kwargs)
            finally:
                set_function_modes(before)

    return recompute


class CheckpointFunction(torch_checkpoint.CheckpointFunction):
    """torch's reentrant checkpoint, whose backward re-runs the function under_forward_modes (named
    as torch's, so the graph's node keeps its name, CheckpointFunctionBackward)."""

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        recompute = under_forward_modes(run_function)
        outputs = _TORCH_CHECKPOINT_FUNCTION.forward(ctx, run_function, preserve_rng_state, *args)
        ctx.run_function = recompute
        return outputs


_TORCH_CHECKPOINT_FUNCTION = torch_checkpoint.CheckpointFunction
_TORCH_WITHOUT_REENTRANT = torch_checkpoint._checkpoint_without_reentrant_generator


def _without_reentrant(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint (the generator `checkpoint` drives), recomputing
    under_forward_modes: `checkpoint` runs the forward itself, the generator only the recomputation."""
    return _TORCH_WITHOUT_REENTRANT(under_forward_modes(fn), *args, **kwargs)


COMPOSABLE_CHECKPOINT = "torch.distributed._composable.checkpoint_activation"
"""torch.distributed's `checkpoint(module)`, which binds the non-reentrant generator at its import."""


def follow_checkpoints() -> None:
    """Make torch.utils.checkpoint recompute under the modes of its forward (module docstring), by
    the objects `checkpoint` looks up when called (and torch.distributed's composable checkpoint, by
    its own name for the generator: imported later, it binds this one)."""
    torch_checkpoint.CheckpointFunction = CheckpointFunction  # type: ignore[misc]
    torch_checkpoint._checkpoint_without_reentrant_generator = _without_reentrant
    composable = sys.modules.get(COMPOSABLE_CHECKPOINT)
    if composable is not None and hasattr(composable, "_checkpoint_without_reentrant_generator"):
        setattr(composable, "_checkpoint_without_reentrant_generator", _without_reentrant)  # noqa: B010
