"""Exponent bookkeeping between NITI layers: the tensor tagged with its exponent, and the slot the
error's exponent travels back in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dse.formats.base import host_abs_max
from dse.train.niti.ti_torch import FLOAT32_EXACT, FLOAT64_EXACT, _float_to_int

Exponent = int | tuple[int, ...]
"""A NITI tensor's power-of-two exponent: one per tensor, or one per member of a stacked tensor
(grouped training, dse/train/niti/stacked.py: members along the leading axis)."""


class _ErrorSlot:
    """Where the NITI consumer of a tensor leaves the exponent of the error it sends back."""

    __slots__ = ("exp", "writers")

    def __init__(self) -> None:
        self.exp: Exponent | None = None
        self.writers = 0

    def write(self, exp: Exponent) -> None:
        self.exp = exp
        self.writers += 1

    def read(self) -> Exponent | None:
        """The error exponent, if exactly one NITI consumer wrote it (several errors were summed)."""
        return self.exp if self.writers == 1 else None


class NitiTensor(Tensor):
    """A float tensor holding m * 2^niti_exp exactly, m the integer mantissa of a NITI tensor.

    Ops that keep values on the same grid keep the tag; every other op returns a plain tensor.
    """

    niti_exp: Exponent
    niti_slot: _ErrorSlot | None

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func not in _GRID_PRESERVING and not _is_zero_pad(func, args, kwargs):
            return out
        source = next((a for a in args if isinstance(a, NitiTensor)), None)
        if source is None:
            return out
        if func is Tensor.__iter__:  # `q, k, v = t` unpacks along dim 0
            return iter(_tag_outputs(tuple(out), source.niti_exp, source.niti_slot))
        return _tag_outputs(out, source.niti_exp, source.niti_slot)


def _tag(t: Tensor, exp: Exponent, slot: _ErrorSlot | None) -> NitiTensor:
    tagged = t.as_subclass(NitiTensor)
    tagged.niti_exp = exp
    tagged.niti_slot = slot
    return tagged


def _tag_outputs(out: Any, exp: Exponent, slot: _ErrorSlot | None) -> Any:
    if isinstance(out, Tensor) and out.is_floating_point():
        return _tag(out, exp, slot)
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_tag_outputs(o, exp, slot) for o in out)
    if isinstance(out, list):
        return [_tag_outputs(o, exp, slot) for o in out]
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):  # named tuple (values, indices)
        return type(out)(_tag_outputs(out[0], exp, slot), *out[1:])
    return out


def _grid_preserving() -> set[Callable]:
    """Ops whose outputs are entries (or maxima) of their input: the exponent still applies."""
    T = Tensor
    names = [
        (F, "relu"), (F, "relu_"), (torch, "relu"), (torch, "relu_"), (T, "relu"), (T, "relu_"),
        (F, "max_pool1d"), (F, "max_pool2d"), (F, "max_pool3d"), (F, "max_pool1d_with_indices"),
        (F, "max_pool2d_with_indices"), (F, "max_pool3d_with_indices"), (F, "adaptive_max_pool1d"),
        (F, "adaptive_max_pool2d"), (torch, "max_pool1d"), (torch, "max_pool2d"),
        (T, "view"), (T, "view_as"), (T, "reshape"), (T, "reshape_as"), (torch, "reshape"),
        (T, "flatten"), (torch, "flatten"), (T, "unflatten"), (torch, "unflatten"),
        (T, "permute"), (torch, "permute"), (T, "transpose"), (torch, "transpose"), (T, "t"),
        (T, "contiguous"), (T, "clone"), (torch, "clone"), (T, "detach"),
        (T, "squeeze"), (torch, "squeeze"), (T, "unsqueeze"), (torch, "unsqueeze"),
        (T, "__getitem__"), (T, "narrow"), (torch, "narrow"), (T, "split"), (torch, "split"),
        (T, "chunk"), (torch, "chunk"), (T, "unbind"), (torch, "unbind"), (T, "expand"),
        (T, "expand_as"), (T, "flip"), (torch, "flip"), (T, "float"), (T, "__iter__"),
    ]
    return {getattr(owner, name) for owner, name in names if hasattr(owner, name)}


_GRID_PRESERVING = _grid_preserving()


def _is_zero_pad(func: Callable, args: Sequence, kwargs: dict) -> bool:
    if func is not F.pad:
        return False
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode == "constant" and not value


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor) if isinstance(t, NitiTensor) else t


def _mantissa_of(values: Tensor, exp: int | None, bitwidth: int) -> tuple[Tensor, int]:
    """(m, e) of a tensor: the tagged exponent when the values sit on its grid, else TiFloatToInt8.

    m is a float32 tensor holding the integers (exact: |m| <= 2^15).
    """
    values = _plain(values).detach()
    if exp is not None and abs(exp) <= 100 and values.dtype == torch.float32:
        mantissa = values * 2.0**-exp  # exact: a power-of-two scaling inside float32's range
        if torch.equal(mantissa, torch.round(mantissa)) and host_abs_max(mantissa) <= 2**bitwidth:
            return mantissa, exp
    mantissa, exp = _float_to_int(values, bitwidth)
    return mantissa.to(torch.float32), exp


_Activation = tuple[Tensor, int, "_ErrorSlot | None"]
"""A NITI layer's input: its mantissa, exponent and the slot its producer reads the error exponent from."""


def _per_tensor(exp: Exponent | None) -> int | None:
    """A per-tensor exponent (a stacked tensor's exponents never reach a layer of one network)."""
    assert not isinstance(exp, tuple), "a stacked NITI tensor reached a NITI layer of one network"
    return exp


def _activation_of(x: Tensor, bitwidth: int) -> _Activation:
    exp = _per_tensor(getattr(x, "niti_exp", None)) if isinstance(x, NitiTensor) else None
    slot = getattr(x, "niti_slot", None) if isinstance(x, NitiTensor) else None
    mantissa, exp = _mantissa_of(x, exp, bitwidth)
    return mantissa, exp, slot


def _error_of(grad: Tensor, slot: _ErrorSlot | None, bitwidth: int) -> tuple[Tensor, int]:
    return _mantissa_of(grad, _per_tensor(slot.read()) if slot is not None else None, bitwidth)


_EXACT_SCALING = 100
"""|e| up to which m * 2^e is scaled in the tensor's own float dtype (float32 and float64 exactly)."""


def _largest(exp: Exponent) -> int:
    return max(map(abs, exp)) if isinstance(exp, tuple) else abs(exp)


def _negated(exp: Exponent) -> Exponent:
    return tuple(-e for e in exp) if isinstance(exp, tuple) else -exp


def _pow2(exp: Exponent, like: Tensor, dtype: torch.dtype) -> float | Tensor:
    """2^exp: a Python float, or per member (a tuple) a (G, 1, ..., 1) tensor of `dtype` shaped to
    broadcast against `like`, members along its leading axis. Both are exact (Python floats)."""
    if not isinstance(exp, tuple):
        return 2.0**exp
    shape = (len(exp), *[1] * (like.dim() - 1))
    return torch.tensor([2.0**e for e in exp], dtype=dtype, device=like.device).view(shape)


def _value(mantissa: Tensor, exp: Exponent, dtype: torch.dtype) -> Tensor:
    """mantissa * 2^exp in `dtype` (exact while the value stays inside dtype's normal range); per
    member where exp is a tuple."""
    if _largest(exp) <= _EXACT_SCALING and dtype in (torch.float32, torch.float64):
        return mantissa.to(dtype) * _pow2(exp, mantissa, dtype)
    return (mantissa.double() * _pow2(exp, mantissa, torch.float64)).to(dtype)


def _mantissa_bound(bitwidth: int) -> float:
    """The largest |product| of two mantissas (TiFloatToInt8 may give -2^bitwidth)."""
    return float(4**bitwidth)


def _exact_dtype(bound: float) -> torch.dtype:
    """float32 when every partial sum stays below 2^24 (exact), float64 below 2^53."""
    if bound < FLOAT32_EXACT:
        return torch.float32
    if bound < FLOAT64_EXACT:
        return torch.float64
    raise ValueError(f"integer GEMM too large to emulate exactly (|sum| bound {bound:.3g} >= 2^53)")


def _float_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


# ----------------------------------------------------------------------------------------------
# NITI layers
