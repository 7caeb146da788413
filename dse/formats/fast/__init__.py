"""Fast paths: faster computations of what a format's reference rounding computes, kept apart from
the formats' definitions.

Each family module (floating.py, lns.py, block.py, posit.py, ...) defines its grid, its codes and
a plain reference rounding. The modules here hold what makes those fast on a CPU (fused
magic-constant kernels, exact torch casts, lookup tables, integer block kernels, host-side scales,
cache-sized slices), and each is registered here with the reference it must equal bit for bit, the
formats, roundings and dtypes it serves, and the code space on which the tests compare the two
(tests/formats/test_fast_paths.py runs every registered path against its reference, with
`reference_only()` switching every fast path off, and checks that the path did run).

A family asks `enabled(name)` before it takes a fast path: False inside `reference_only()`, and the
name is recorded inside `recording()`.

What is fast on a CPU may be slow on a GPU: a value read back to the host to pick a path (a scale, a
check of the block maxima) costs nanoseconds on the CPU and stalls every launched kernel on a GPU.
Such CPU-only shortcuts ask `host_shortcuts(device)`, the one decision between the CPU path and the device
path; `device_path()` makes CPU tensors take the device path, so that tests on a machine without a
GPU run it (tests/formats/test_host_syncs.py counts its host synchronisations: none).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

Operation = Literal["quantize", "round_unscaled"]
CodeSpace = Literal["grid", "scaled", "blocks", "wide"]
T = TypeVar("T")


@dataclass(frozen=True)
class FastPath:
    """A fast computation and the reference it must equal.

    `operation` is the NumberFormat method whose results it gives (`quantize`, or `round_unscaled`
    on unscaled values); `formats`, `roundings` and `dtypes` are the cases it serves, on which the
    tests check it; `code_space` the inputs they check it over: `grid` every value of the format's
    grid, every midpoint between neighbours and its float neighbours, specials and random bit
    patterns of every exponent, at several scales; `scaled` the finite part of `grid` times 2^-5
    (a tensor whose scale is a moderate power of two); `blocks` blocks whose max has every float32
    exponent, with element ties, zeros, inf and NaN; `wide` float values of every exponent.
    """

    name: str
    reference: str
    operation: Operation
    formats: tuple[str, ...]
    roundings: tuple[str, ...] = ("nearest",)
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    code_space: CodeSpace = "grid"


FAST_PATHS: dict[str, FastPath] = {}

_DEVICE_PATH = contextvars.ContextVar("dse_device_path", default=False)
_REFERENCE_ONLY = contextvars.ContextVar("dse_reference_only", default=False)
_USED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("dse_fast_paths_used", default=None)


def register(path: FastPath) -> str:
    """Add a fast path to the registry; its name, for `enabled`."""
    if path.name in FAST_PATHS and FAST_PATHS[path.name] != path:
        raise ValueError(f"fast path {path.name!r} is registered twice")
    FAST_PATHS[path.name] = path
    return path.name


def enabled(name: str) -> bool:
    """Whether fast path `name` may run now (not inside `reference_only()`); records it as used."""
    if _REFERENCE_ONLY.get():
        return False
    used = _USED.get()
    if used is not None:
        used.add(name)
    return True


def reference_only_active() -> bool:
    """Inside `reference_only()`."""
    return _REFERENCE_ONLY.get()


@contextlib.contextmanager
def _set_within(variable: contextvars.ContextVar[Any], value: T) -> Iterator[T]:
    """`variable` holds `value` inside the block (yielded), and what it held before after it."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def reference_only() -> contextlib.AbstractContextManager[bool]:
    """Run every format's reference rounding inside the block: no fast path, whole tensors."""
    return _set_within(_REFERENCE_ONLY, True)


def recording() -> contextlib.AbstractContextManager[set[str]]:
    """The names of the fast paths taken inside the block."""
    used: set[str] = set()
    return _set_within(_USED, used)


def host_shortcuts(device: torch.device) -> bool:
    """Whether work on tensors of `device` may take CPU-only shortcuts (values read back to the host,
    torch's casts, cache-sized slices): on the CPU, outside `device_path()`; never on an accelerator."""
    return device.type == "cpu" and not _DEVICE_PATH.get()


def device_path() -> contextlib.AbstractContextManager[bool]:
    """CPU tensors take the device path inside the block (no host shortcuts), as on a GPU."""
    return _set_within(_DEVICE_PATH, True)
