"""Elementwise kernels whose last bits depend on where an element sits, run on a stacked tensor so
that each member's elements get the bits they get alone.

torch's CPU elementwise loops run a vector kernel over blocks of twice the vector width and the
scalar function over the rest of a contiguous stretch (ATen's cpu/Loops.h `vectorized_loop`), and
on several threads an operation over PARALLEL_GRAIN elements or more is split among them. Where the
vector and scalar functions disagree in the last bit (measured on torch 2.13, AVX-512, by
`benchmarks/stacked_kernels.py`: pow with a tensor exponent, exp2, sigmoid, SiLU, softplus, Mish,
ELU, SELU, CELU, tanh-approximated GELU, float64 GELU, and their backward kernels), an element's
bits depend on where the stretch ends: alone at the end of the member's own tensor, stacked at the
end of the group's. exp, log, log2, erf, tanh, sqrt and exact IEEE arithmetic give the same bits
anywhere. On CUDA every element takes one scalar function wherever it sits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

PARALLEL_GRAIN = 32768
"""at::internal::GRAIN_SIZE: torch runs an elementwise operation over fewer elements on one thread."""

VECTOR_BLOCK = 64
"""A multiple of every CPU vector loop's block (2 x the vector width, at most 32 float32 elements
on AVX-512): a stretch of a multiple of this many elements has no scalar tail."""


def _thread_stretches_aligned(numel: int) -> bool:
    """Whether torch's split of `numel` elements among its threads leaves every stretch a whole
    number of vector blocks (at::parallel_for: min(threads, ceil(numel / grain)) stretches of
    ceil(numel / stretches) elements)."""
    stretches = min(torch.get_num_threads(), -(-numel // PARALLEL_GRAIN))
    return stretches <= 1 or (-(-numel // stretches)) % VECTOR_BLOCK == 0


def whole_is_as_alone(x: Tensor, members: int) -> bool:
    """Whether one call over x gives each member's block its bits alone anyway: on CUDA; or where x
    is contiguous and each member's block and every thread's stretch, alone and stacked, are whole
    vector blocks, so that no element takes the scalar tail in either."""
    if members <= 1 or x.device.type != "cpu":
        return True
    each = x.numel() // members
    return (x.is_contiguous() and each % VECTOR_BLOCK == 0 and _thread_stretches_aligned(x.numel())
            and _thread_stretches_aligned(each))


def member_kernel(op: Callable[[Tensor], Tensor], x: Tensor, members: int) -> Tensor:
    """op(x), for an elementwise `op` and an x whose leading axis holds `members` equal blocks (a
    stacked tensor, or a folded batch), with each member's block given the bits op gives it alone:
    one call where `whole_is_as_alone`, else member by member on the members' own blocks
    (differentiable: torch.cat's backward hands each member's op its own gradient block)."""
    if whole_is_as_alone(x, members):
        return op(x)
    return torch.cat([op(block) for block in x.chunk(members)])

POSITION_DEPENDENT_FUNCTIONS: frozenset[Any] = frozenset({
    F.gelu, F.silu, F.softplus, F.mish, F.elu, F.selu, F.celu, F.sigmoid,
    torch.sigmoid, Tensor.sigmoid, torch.special.expit, torch.exp2, Tensor.exp2, torch.special.exp2,
    torch.pow, Tensor.pow, Tensor.__pow__, Tensor.__rpow__, torch.float_power, Tensor.float_power,
})
"""The elementwise functions whose CPU vector and scalar kernels (forward or backward) measurably
disagree in the last bit (benchmarks/stacked_kernels.py), as a network's forward may call them."""


def _exact_gelu(func: Any, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """float32 GELU with erf (the transformer proxy's): the same bits anywhere, forward and backward
    (measured on AVX-512 and, with ATEN_CPU_CAPABILITY=avx2, AVX2), so it needs no mode."""
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    return func is F.gelu and x.dtype == torch.float32 and approximate == "none"


class MemberKernelMode(TorchFunctionMode):
    """Runs a stacked network's POSITION_DEPENDENT_FUNCTIONS on a folded batch (member g's samples
    are rows g*B to (g+1)*B-1) through `member_kernel`, so each member's rows get its bits alone;
    every other call runs as it is. `seen` tells whether the forward called any of them."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in POSITION_DEPENDENT_FUNCTIONS:
            return func(*args, **kwargs)
        folded = next((a for a in args if isinstance(a, Tensor)), None)
        members = self.members
        if (folded is None or folded.dim() == 0 or folded.shape[0] % members or not folded.is_floating_point()
                or folded.device.type != "cpu" or _exact_gelu(func, folded, args, kwargs)):
            return func(*args, **kwargs)
        self.seen = True
        rows = folded.shape[0]

        each_rows = rows // members

        def call(block: int) -> Any:  # narrow: autograd lets an in-place call write into one view
            return func(*[a.narrow(0, block * each_rows, each_rows)
                          if isinstance(a, Tensor) and a.dim() and a.shape[0] == rows else a for a in args],
                        **kwargs)

        if kwargs.get("inplace"):
            for block in range(members):
                call(block)
            return folded
        if whole_is_as_alone(folded, members):
            return func(*args, **kwargs)
        return torch.cat([call(block) for block in range(members)])


CALLS_NONE_TORCH_LAYERS: frozenset[type[nn.Module]] = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Sequential, nn.ModuleList, nn.Flatten, nn.Identity,
    nn.LayerNorm, nn.Embedding, nn.MaxPool1d, nn.MaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
})
"""torch.nn layers whose forward calls none of POSITION_DEPENDENT_FUNCTIONS (those the built-in
proxies are made of); a subclass is not one of them."""

OWN_PACKAGE = "dse."
"""Where our modules are defined (dse.models' proxies, dse.train's layers; a user's file loads as
dse_user_...): they call none of them (tests/train/test_member_kernels.py runs every proxy under
the mode, in train and eval mode)."""


def may_call_position_dependent(net: nn.Module) -> bool:
    """Whether a forward of `net` may call one of POSITION_DEPENDENT_FUNCTIONS: unless every module
    in it is our own or one of CALLS_NONE_TORCH_LAYERS. Decided from the modules, not from a forward:
    a user's module may call one on any later forward only (in eval mode, for some inputs)."""
    return not all(type(module) in CALLS_NONE_TORCH_LAYERS or type(module).__module__.startswith(OWN_PACKAGE)
                   for module in net.modules())
