"""Host synchronisations counted without a GPU: what would make the host wait for the device.

On a GPU, torch launches kernels asynchronously; the host waits for every launched kernel to finish
wherever it needs a value back (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `if t.any():`), an
output whose shape depends on the data (`nonzero`, boolean indexing, `unique`, `masked_select`), or
host data copied in (`torch.tensor([...], device=...)` from pageable memory). `HostSyncs` records
each of these while code runs on CPU tensors: run it inside `dse.formats.fast.device_path()`, so the
code takes the path it takes on a GPU, and the count is what that path would make the GPU wait.

Two layers catch them: a TorchDispatchMode sees the aten operations (`_local_scalar_dense` is every
scalar read: item, bool, float, int), and a TorchFunctionMode sees the Python methods that read a
tensor without an aten operation (`tolist`, `numpy`, `cpu`, `.to("cpu")`).

One read is not counted: torch.optim's `_get_value` of an optimizer's `step` count, which torch keeps
in a CPU tensor for parameters on any device (unless `capturable`), so that reading it waits for
nothing.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten operations that wait for the device: a scalar read back, or an output sized by the data.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "scalar read (item, bool, float, int)",
    aten.is_nonzero.default: "bool(tensor)",
    aten.equal.default: "torch.equal",
    aten.allclose.default: "torch.allclose",
    aten.nonzero.default: "nonzero (output sized by the data)",
    aten.masked_select.default: "masked_select (output sized by the data)",
    aten._unique2.default: "unique (output sized by the data)",
    aten.unique_dim.default: "unique (output sized by the data)",
    aten.unique_consecutive.default: "unique_consecutive (output sized by the data)",
    aten.repeat_interleave.Tensor: "repeat_interleave by a tensor (output sized by the data)",
    aten.lift_fresh.default: "a tensor made from host data (a host-to-device copy)",
}

# Python methods that read a tensor back to the host without an aten operation of their own.
_READING_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu",
                    torch.Tensor.__array__: "__array__"}


def _to_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a Tensor.to call names the CPU as its target."""
    targets = [*args[1:], kwargs.get("device")]
    return any(torch.device(t).type == "cpu" for t in targets if isinstance(t, (str, torch.device)))


class HostSyncs:
    """A context manager that records every host synchronisation inside it (`syncs`: a list of
    (what, where) pairs, `where` the innermost frames of the project's code that made it)."""

    def __init__(self) -> None:
        self.syncs: list[tuple[str, str]] = []
        outer = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                                   kwargs: dict[str, Any] | None = None) -> Any:
                kwargs = kwargs or {}
                what = SYNCING_OPS.get(func)
                if what is None and func is aten.index.Tensor and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                    what = "boolean indexing (output sized by the data)"
                if what is not None:
                    outer._record(what)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                                   kwargs: dict[str, Any] | None = None) -> Any:
                kwargs = kwargs or {}
                what = _READING_METHODS.get(func)
                if what is None and func is torch.Tensor.to and _to_host(args, kwargs):
                    what = ".to(cpu)"
                if what is not None:
                    outer._record(what)
                return func(*args, **kwargs)

        self._modes = [_Function(), _Dispatch()]

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-1]
        if any(f.name == "_get_value" and f.filename.endswith("torch/optim/optimizer.py") for f in stack):
            return  # an optimizer's step count, which torch keeps on the host
        frames = [f for f in stack if "/dse/" in f.filename]
        where = " <- ".join(f"{f.filename.split('/dse/')[-1]}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
        self.syncs.append((what, where or "(outside dse)"))

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        """One line per distinct sync, with its count."""
        counts: dict[tuple[str, str], int] = {}
        for sync in self.syncs:
            counts[sync] = counts.get(sync, 0) + 1
        return "\n".join(f"{n} x {what} at {where}" for (what, where), n in counts.items())
