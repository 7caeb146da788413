"""Cache-sized slices: elementwise rounding on the CPU runs over slices of the tensor, so that each
slice's passes stay in cache and no fresh full-size temporaries are page-faulted in.

Elementwise rounding gives the same values slice by slice as over the whole tensor, and random
draws of a CPU generator concatenate (n1 then n2 draws are n1 + n2 draws), so stochastic rounding
draws the same bits too.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
from torch import Tensor

from dse.formats.fast import FastPath, _set_within, enabled, host_shortcuts, reference_only_active, register

# Elements per slice and torch thread, for passes that keep two slice-sized tensors (input and
# output) in cache; `buffers` more of them share the same space (smaller slices).
CPU_SLICE_ELEMENTS_PER_THREAD = 1 << 17

SLICES = register(FastPath(
    name="cpu-slices",
    reference="the same elementwise rounding over the whole tensor at once",
    operation="quantize",
    formats=("fp8_e4m3", "fp(e=5,m=4)", "fp(e=3,m=2,subnormals=0)", "posit16", "nvfp4", "mxfp4"),
    roundings=("nearest", "toward_zero", "pseudo_stochastic", "stochastic", "stochastic(5)"),
    dtypes=(torch.float32, torch.float64),
    code_space="wide",
))

_WHOLE_TENSORS = contextvars.ContextVar("dse_whole_tensors", default=False)
"""Set while `quantize_members` rounds stochastically with `MemberGenerators`: slices would cut across
members' draws."""


def cpu_chunk_elements(x: Tensor, buffers: int = 2) -> int:
    """Elements per slice for x: cache-sized per thread on the CPU, the whole tensor elsewhere.
    `buffers`: the slice-sized tensors a slice's passes keep in cache (input, output, scratch)."""
    if not host_shortcuts(x.device) or _WHOLE_TENSORS.get() or reference_only_active():
        return max(x.numel(), 1)
    chunk = max(CPU_SLICE_ELEMENTS_PER_THREAD * 2 // buffers, 1) * torch.get_num_threads()
    if x.numel() > chunk:
        enabled(SLICES)  # (records its use)
    return chunk


def whole_tensors(active: bool = True) -> contextlib.AbstractContextManager[object]:
    """Round tensors whole (no cache-sized slices) inside the block, when `active`."""
    return _set_within(_WHOLE_TENSORS, True) if active else contextlib.nullcontext()


def for_slices(x: Tensor, out: Tensor, round_slice: Callable[[Tensor, Tensor], object], buffers: int = 2
               ) -> None:
    """round_slice(part, out_part) over aligned slices of x and out (contiguous, one shape), 1-d and
    `cpu_chunk_elements(x, buffers)` long (the last one shorter); one call with x and out as they are
    where they fit in one slice (no views: each costs as much as a small operation)."""
    chunk = cpu_chunk_elements(x, buffers)
    if x.numel() <= chunk:
        round_slice(x, out)
        return
    flat, flat_out = x.view(-1), out.view(-1)
    for start in range(0, flat.numel(), chunk):
        round_slice(flat[start:start + chunk], flat_out[start:start + chunk])


def slice_scratch(x: Tensor, dtype: torch.dtype, buffers: int = 2) -> Tensor:
    """Spare space for one slice of `for_slices` over x (with as many `buffers`): x's shape where x is
    one slice, else one slice."""
    chunk = cpu_chunk_elements(x, buffers)
    return torch.empty(x.shape if x.numel() <= chunk else (chunk,), dtype=dtype, device=x.device)


def fitted(scratch: Tensor, part: Tensor) -> Tensor:
    """`slice_scratch` space for `part`: all of it, or its start for a shorter last slice."""
    size = part.numel()
    return scratch if size == scratch.numel() else scratch[:size]


Kernel = Callable[[Tensor, Tensor, Tensor], None]
"""An elementwise rounding kernel(x, out, int scratch) that writes into out."""


def map_chunks(kernel: Kernel, x: Tensor, int_dtype: torch.dtype) -> Tensor:
    """out = kernel(x) slice by slice (`for_slices`), with an integer scratch of int_dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    scratch = slice_scratch(x, int_dtype)
    for_slices(x, out, lambda part, result: kernel(part, result, fitted(scratch, part)))
    return out


def in_chunks(round_chunk: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply an elementwise function slice by slice (`for_slices`): on the CPU its passes run in cache."""
    if x.numel() <= cpu_chunk_elements(x):
        return round_chunk(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    for_slices(x, out, lambda part, result: result.copy_(round_chunk(part)))
    return out
