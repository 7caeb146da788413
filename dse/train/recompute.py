"""Activation checkpointing under dse's torch-function modes: a checkpointed block recomputed in the
backward runs under the modes of ours its forward ran under, with their state as it was then.

dse enters its torch-function modes (`MemberKernelMode`, the functional-GEMM mode) by a network's
forward hooks, so they are on the stack while the forward runs and off it when `backward()` runs.
`torch.utils.checkpoint.checkpoint` runs a block in the forward and again in the backward (the
reentrant form re-runs the function in `CheckpointFunction.backward`; the non-reentrant form in the
unpack hook of a saved tensor); without the modes the recomputation computes other tensors than the
forward did (a group's activations over the whole folded batch, a functional GEMM unquantized) and
saves another number of them (non-reentrant: CheckpointError). So `follow_checkpoints` wraps the
function both forms recompute (in torch's reentrant Function's own forward, and the non-reentrant
generator `checkpoint` looks up when called; and torch.distributed's composable
`checkpoint(module)`, which drives the non-reentrant generator itself), once per process, when a
mode of ours is first installed or a run starts training (`replaying`): where a mode of ours is on
the stack when `checkpoint` is called (`checkpoint_sequential` calls it too), the recomputation
runs with those modes pushed above the backward's stack in their order, each with the state it had
then (`RecomputedMode.recompute_state`); where none is (and no run's generators are replayed),
torch's function runs as it is.

A run's stochastic-rounding generators (`replaying`, entered by `train` and `train_group` around
their training loop) are replayed the same way: a recomputation draws from each the numbers its
forward drew, and leaves it where the backward had it, as torch's `preserve_rng_state` does for
torch's own generators; so checkpointing changes no rounding draw, and a checkpointed network trains
bit for bit as without checkpointing (`preserve_rng_state=False` opts out of the replay, as in torch).

Whether this torch's checkpoint recomputes through what dse replaced is checked once per process,
by a checkpoint of each form under a probe mode (`check_checkpoints_followed`), where a run training
(`replaying`) first checkpoints: found by torch's public entry points, `checkpoint` and
`checkpoint_sequential` (wrapped when this module is imported, so a user's file loaded later binds the
wrapper; they pass through otherwise), by the modules of the network a run trains marked by
torch.distributed's composable `checkpoint(module)`, and by a module class of that network defined in
a file holding torch's own entry points (bound before dse was imported); none of these depends on
the replaced parts being looked up. Where the check fails it raises `CheckpointsNotFollowed` (naming
the torch version and the form), an `Unsupported` error: `dse train` prints it as one line and exits
2, a sweep runs and stores its other trials and then stops naming the trial. A torch whose
checkpoint looked its parts up otherwise would recompute without the modes and draws, silently
giving other bits; a network that never checkpoints trains on it as on any other.

What this does not reach - a recomputation by other code than these functions of torch's, a
user's `autograd.Function` whose backward calls a position-dependent function (the autograd engine
runs every backward with no torch-function mode) - the grouped trainer finds before training
(dse/train/grouped.py, `backward_reason`) and trains one by one, saying why.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor
from torch.overrides import TorchFunctionMode

from dse.errors import Unsupported


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


class _Replayed(threading.local):
    def __init__(self) -> None:
        self.runs: list[list[torch.Generator]] = []


_REPLAYED = _Replayed()
"""Per thread (the one a forward, hence `checkpoint`, runs on): the generators of the runs training."""


@contextlib.contextmanager
def replaying(generators: Sequence[torch.Generator], model: torch.nn.Module | None = None) -> Iterator[None]:
    """The block with a run's stochastic-rounding `generators` replayed by every checkpointed block's
    recomputation (module docstring); a `model` checkpointed by the composable form, or defined where
    torch's own entry points were bound before dse wrapped them, is checked now; one that calls
    `checkpoint` when it first does."""
    follow_checkpoints()
    if model is not None and (_composable_checkpointed(model) or _binds_torchs_own_entries(model)):
        check_once()
    _REPLAYED.runs.append(list(generators))
    try:
        yield
    finally:
        _REPLAYED.runs.pop()


def under_forward_modes(function: Callable[..., Any], preserve_rng_state: bool = True) -> Callable[..., Any]:
    """`function`, run later (a recomputation) under the RecomputedModes on the stack now, in their
    order above the modes of the time it runs, each with its state of now, and (`preserve_rng_state`)
    drawing from the replayed generators what it draws now; `function` itself where neither applies."""
    modes = [mode for mode in function_modes() if isinstance(mode, RecomputedMode)]
    generators = [g for run in _REPLAYED.runs for g in run] if preserve_rng_state else []
    if not modes and not generators:
        return function
    states = [mode.recompute_state() for mode in modes]
    drawn_from = [g.get_state() for g in generators]

    @functools.wraps(function, updated=())  # (not a module's __dict__: the composable form passes one)
    def recompute(*args: Any, **kwargs: Any) -> Any:
        before = function_modes()
        backward_states = [g.get_state() for g in generators]
        with contextlib.ExitStack() as contexts:
            for state in states:
                contexts.enter_context(state())
            for generator, state_then in zip(generators, drawn_from, strict=True):
                generator.set_state(state_then)
            set_function_modes([mode for mode in before if not isinstance(mode, RecomputedMode)] + modes)
            try:
                return function(*args, **kwargs)
            finally:
                set_function_modes(before)
                for generator, state_now in zip(generators, backward_states, strict=True):
                    generator.set_state(state_now)

    return recompute


TORCH_CHECKPOINT_FUNCTION: Any = getattr(torch_checkpoint, "CheckpointFunction", None)
TORCH_REENTRANT_FORWARD: Any = getattr(TORCH_CHECKPOINT_FUNCTION, "forward", None)
_TORCH_WITHOUT_REENTRANT: Any = getattr(torch_checkpoint, "_checkpoint_without_reentrant_generator", None)
"""torch's (getattr: a torch without them imports this module, and `follow_checkpoints` says why not)."""


def _reentrant_forward(ctx: Any, run_function: Callable[..., Any], preserve_rng_state: bool,
                       *args: Any) -> Any:
    """torch's reentrant checkpoint's forward, whose backward then re-runs the function
    under_forward_modes (set on torch's own class: the graph's node, CheckpointFunctionBackward, stays
    torch's, and a name bound to the class before, `from torch.utils.checkpoint import
    CheckpointFunction`, calls it too)."""
    recompute = under_forward_modes(run_function, preserve_rng_state)
    outputs = TORCH_REENTRANT_FORWARD(ctx, run_function, preserve_rng_state, *args)
    ctx.run_function = recompute
    return outputs


def _without_reentrant(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint (the generator `checkpoint` drives), recomputing
    under_forward_modes: `checkpoint` runs the forward itself, the generator only the recomputation
    (its second argument, positional from both callers, is preserve_rng_state)."""
    preserve_rng_state = bool(args[0]) if args else bool(kwargs.get("preserve_rng_state", True))
    return _TORCH_WITHOUT_REENTRANT(under_forward_modes(fn, preserve_rng_state), *args, **kwargs)


COMPOSABLE_CHECKPOINT = "torch.distributed._composable.checkpoint_activation"
"""torch.distributed's `checkpoint(module)`, which binds the non-reentrant generator at its import."""


class CheckpointsNotFollowed(Unsupported):
    """This torch's activation checkpointing does not recompute through what dse replaced."""


_FOLLOWED: list[bool] = []
"""[True] once `check_once` has checked this torch."""


def follow_checkpoints() -> None:
    """Make torch.utils.checkpoint recompute under the modes of its forward (module docstring), by
    the reentrant Function's forward and the non-reentrant generator `checkpoint` looks up when called
    (and torch.distributed's composable checkpoint, by its own name for the generator: imported later,
    it binds this one). Idempotent: called where a mode of ours is installed and a run starts training;
    the check runs where a run training first checkpoints (`check_once`)."""
    _replace_torchs_parts()


def _replace_torchs_parts() -> None:
    if TORCH_REENTRANT_FORWARD is not None:
        TORCH_CHECKPOINT_FUNCTION.forward = staticmethod(_reentrant_forward)
    if _TORCH_WITHOUT_REENTRANT is not None:
        torch_checkpoint._checkpoint_without_reentrant_generator = _without_reentrant
    composable = sys.modules.get(COMPOSABLE_CHECKPOINT)
    if composable is not None and hasattr(composable, "_checkpoint_without_reentrant_generator"):
        setattr(composable, "_checkpoint_without_reentrant_generator", _without_reentrant)  # noqa: B010


def check_once() -> None:
    """`check_checkpoints_followed`, the first time only (CheckpointsNotFollowed every time it failed):
    run with no torch-function mode on the stack and only the probe's generator replayed, wherever it is
    called from (inside a forward under a run's modes)."""
    if _FOLLOWED:
        return
    modes, runs = function_modes(), _REPLAYED.runs
    set_function_modes([])
    _REPLAYED.runs = []
    try:
        check_checkpoints_followed()
    finally:
        _REPLAYED.runs = runs
        set_function_modes(modes)
    _FOLLOWED.append(True)


def _checked_where_training(entry: Callable[..., Any]) -> Callable[..., Any]:
    """torch's public checkpoint entry point `entry`, checking this torch first where a run is training."""

    @functools.wraps(entry)
    def checkpoint_entry(*args: Any, **kwargs: Any) -> Any:
        if _REPLAYED.runs and not _FOLLOWED:
            check_once()
        return entry(*args, **kwargs)

    checkpoint_entry.__wrapped_by_dse__ = True  # type: ignore[attr-defined]
    return checkpoint_entry


TORCH_CHECKPOINT: Callable[..., Any] = torch_checkpoint.checkpoint
"""torch's `checkpoint` (the probe calls it: the wrapper would check again)."""
for _entry in ("checkpoint", "checkpoint_sequential"):
    if not getattr(getattr(torch_checkpoint, _entry, None), "__wrapped_by_dse__", False):
        setattr(torch_checkpoint, _entry, _checked_where_training(getattr(torch_checkpoint, _entry)))
if getattr(TORCH_CHECKPOINT, "__wrapped_by_dse__", False):  # (this module executed again: a reload)
    TORCH_CHECKPOINT = TORCH_CHECKPOINT.__wrapped__  # type: ignore[attr-defined]


TORCHS_OWN_ENTRIES: tuple[Callable[..., Any], ...] = tuple(
    getattr(torch_checkpoint, name).__wrapped__ for name in ("checkpoint", "checkpoint_sequential"))
"""torch's own `checkpoint` and `checkpoint_sequential`, as a file that bound them before this module
wrapped them holds them."""


def _binds_torchs_own_entries(model: torch.nn.Module) -> bool:
    """Whether a module class of `model` (or a base of one) is defined in a file that holds torch's own
    entry points, bound before this module wrapped them (`from torch.utils.checkpoint import
    checkpoint` run before dse was imported, as a script importing its network first does): its calls
    pass by the wrappers, so the run checks this torch as it starts."""
    own = {id(entry) for entry in TORCHS_OWN_ENTRIES}
    files = {cls.__module__ for module in model.modules() for cls in type(module).__mro__}
    for name in files - {"builtins"}:
        if name.split(".")[0] in ("torch", "dse"):
            continue
        namespace = getattr(sys.modules.get(name), "__dict__", {})
        if any(id(value) in own for value in list(namespace.values())):
            return True
    return False


def _composable_checkpointed(model: torch.nn.Module) -> bool:
    """Whether a module of `model` is checkpointed by torch.distributed's composable `checkpoint`
    (which runs by hooks, not by the entry points wrapped above)."""
    contract = sys.modules.get("torch.distributed._composable.contract")
    registry_of = getattr(contract, "_get_registry", None)
    if COMPOSABLE_CHECKPOINT not in sys.modules or registry_of is None:
        return False
    return any("checkpoint" in (registry_of(module) or {}) for module in model.modules())


class _Probe(RecomputedMode):
    """A mode of ours that changes nothing, for `check_checkpoints_followed`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def check_checkpoints_followed() -> None:
    """Raise CheckpointsNotFollowed unless a block checkpointed (each form) under a mode of ours is
    recomputed under it, drawing from a replayed generator what its forward drew."""
    for reentrant in (True, False):
        form = "reentrant" if reentrant else "non-reentrant"
        try:
            recomputations, as_forward = _probe_checkpoint(reentrant)
        except Exception as error:  # a torch whose parts take other arguments
            raise CheckpointsNotFollowed(
                f"torch {torch.__version__}'s torch.utils.checkpoint ({form}) fails under what "
                f"dse/train/recompute.py replaces ({type(error).__name__}: {error}); dse is tested with the "
                f"torch of constraints.txt") from error
        if recomputations != 1 or not as_forward:
            raise CheckpointsNotFollowed(
                f"torch {torch.__version__}'s torch.utils.checkpoint ({form}) does not recompute through the "
                f"objects dse/train/recompute.py replaces (recomputations: {recomputations}, under the "
                f"forward's mode and draws: {as_forward}); dse is tested with the torch of constraints.txt")


def _probe_checkpoint(reentrant: bool) -> tuple[int, bool]:
    """A block checkpointed under _Probe and a replayed generator, run forward and backward: how often
    it was recomputed, and whether under the probe and with the forward's draw."""
    generator = torch.Generator().manual_seed(0)
    seen: list[tuple[bool, float]] = []

    def block(t: Tensor) -> Tensor:
        on_stack = any(isinstance(mode, _Probe) for mode in function_modes())
        seen.append((on_stack, float(torch.rand((), generator=generator, device="cpu"))))
        return t * t

    _REPLAYED.runs.append([generator])
    try:
        with torch.inference_mode(False), torch.enable_grad():  # (wherever it is first called)
            x = torch.ones(2, device="cpu", requires_grad=True)  # (whatever the default device)
            with _Probe():
                y = TORCH_CHECKPOINT(block, x, use_reentrant=reentrant)
            y.sum().backward()
    finally:
        _REPLAYED.runs.pop()
    recomputed = seen[1:]
    return len(recomputed), bool(recomputed) and all(on and draw == seen[0][1] for on, draw in recomputed)
