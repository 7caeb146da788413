"""Whether a group's batched product sums each member's entry as that member's own product alone.

A grouped run (dse/train/stacked.py) computes its members' GEMMs as one batched call - a bmm /
baddbmm, a batched matmul, a chunk of the accumulation emulation - where each member's result is
bit for bit the product the member computes alone; otherwise member by member, with the member's
own call. Which kernel a batched call takes, and how it splits a product among threads, is the
library's choice: torch's CPU loop below 400 multiply-adds, MKL's batched GEMM where an axis is 1,
a bmm split among threads by its batch entries where a member's mm splits the long reduction, and
on CUDA whatever cuBLAS picks for a batched call against a single one. Two ways decide
(`sums_as_members`):

- `bmm_sums_as_mm`, the rule read from aten and measured on the CPU at one thread (13,403 shapes, an
  AVX-512 VM): a product it fails runs member by member without anything run to decide it;
- a probe, wherever the rule holds (at any thread count: batched only where both hold) and on other
  devices (alone): the first time a product of one layout is met in a process - the same site,
  device, dtype, shapes, strides, operand alignment, and library settings (thread count, fp32 matmul
  precision, reduced-precision reductions, deterministic algorithms, BLAS library, cuBLAS workspace,
  MKL's reproducibility mode: `_library_state`) - the batched call and the members' own calls run on
  random data of that layout (fixed seed, no generator of the run touched, no grad, outside any torch
  mode; drawn again until 4096 output elements are compared) and the batched call is used only where
  every bit agrees.
  Normal random operands make any difference in summation order show in the last bits of many output
  elements; a quantized run's operands (few mantissa bits) can only agree more often, never less.

A stacked convolution's products ask `member_layouts`: no rule is known for oneDNN's or cuDNN's
grouped convolution, so the probe decides alone (on normal operands and on operands whose products
all underflow: a grouped kernel may start its sums otherwise, giving +0 where the member's own call
gives -0), and it also records the strides of each member's own outputs (the group stores them so).

A decided call still builds its key: torch tells nobody when a setting changes, so every setting
is read at every call (`_library_state`, each by its cheapest read; only MKL's mode, once MKL refuses
to change it, is kept), and every operand's layout as the caller gives it (`_layout`). One key
answers both questions of a group's GEMM (`aligned_sums_as_members`): which operands
`at_alone_alignment` copies and whether the batched call sums as the members' - so a decided call
checks no alignment again. On a 2-vCPU AMD EPYC a decided `member_gemm` costs 4.3-6.8 us
beyond its bare bmm / baddbmm, 8.0-12.5 when it checked the alignment and built the key apart
(`benchmarks/batched_sums.py --key-cost`, docs/training.md).

A member's own call is compared on its operands where they are alone (`at_alone_alignment`): MKL's
sgemm on an AMD EPYC (AVX-512) sums a product otherwise where its first operand or its output starts
off a 16-byte boundary (10-column outputs: a (50, 37) @ (37, 10) at 8 bytes past 16 differed in 215
of 500 outputs; a bmm whose 7 x 10 or 2 x 37 output blocks lie 280 or 296 bytes apart differed from
each member's mm in 10 of 298 shape-layouts at one thread, where the rule held). Alone a member's
tensor starts where the group's starts (modulo the alignment: a fresh tensor at 0); in the group,
member g's block lies g x its member stride further on. So the group gives each GEMM its members'
operands and output at alone's alignment (a padded copy where the member stride is not a multiple
of it), and the probe, at one thread too, compares against that: on this machine the rule's one-thread
agreement came from the VM's kernels, not from the arithmetic.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import math
import os
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

SMALL_GEMM_MACS = 400
"""aten's threshold (`bmm_out_or_baddbmm_`, LinearAlgebra.cpp): a CPU bmm / baddbmm whose batch
entries have fewer multiply-adds (rows x reduction x columns) runs its own loop (baddbmm_cpu_kernel)
instead of the BLAS GEMM."""

ALIGNMENT_BYTES = {"cpu": 64, "other": 256}
"""The operands' addresses are part of a probe's layout modulo this, per device type: a BLAS may take
another path for an operand that starts off a vector boundary. 64 on the CPU (torch's CPU allocator's
alignment, so a fresh operand's address modulo it does not depend on the process's history); 256 on a
GPU (the alignment cuBLASLt's heuristics are told, up to 256 bytes; torch's caching allocator hands out
blocks at multiples of 512)."""


def alignment_bytes(t: Tensor) -> int:
    """The alignment modulo which `t`'s address is part of a probe's layout."""
    return ALIGNMENT_BYTES["cpu" if t.is_cpu else "other"]


def at_alone_alignment(t: Tensor) -> Tensor:
    """`t` (a leading member axis) with each member's block at the address, modulo `alignment_bytes(t)`,
    and in the strides that the member's tensor has alone: `t` itself where its member stride is a
    multiple of that alignment (or 0) and no other axis strides over all members, else a copy whose
    member blocks start a whole number of alignments apart.

    Alone a member's tensor starts where the group's starts (modulo the alignment: a fresh tensor at
    0), so member g's block, g x its member stride further on in the group, is at alone's address
    only where that stride is a multiple of the alignment. An axis whose stride spans all G members'
    blocks (a batch folded along a later axis: sequence-first attention's (L, G*B, E) makes a member's
    (B, L, E) rows G*B*E apart) strides over one member's alone, G times less. A BLAS may sum
    otherwise for an operand off a vector boundary (MKL's sgemm on an AMD EPYC: a (50, 37) @ (37, 10)
    product at 8 bytes past 16 differed from the aligned one in 215 of 500 outputs), so a group hands
    each member's GEMM its operands, and takes its output, there."""
    strides = t.stride()
    if not strides or strides[0] == 0:
        return t
    members = t.shape[0]
    spanned = members * strides[0]
    aligned = strides[0] * t.element_size() % alignment_bytes(t) == 0
    if aligned and max(strides[1:], default=0) < spanned:
        return t  # (the common case, checked first: a built-in proxy's every GEMM operand passes here)
    if members <= 1 or t.numel() == 0:
        return t
    inner = tuple(s // members if s >= spanned and s % spanned == 0 else s for s in strides[1:])
    if aligned and inner == strides[1:]:
        return t
    if _overlaps(t.shape[1:], inner):  # a broadcast member tensor: dense in its order of axes instead
        inner = torch.empty_like(t[0]).stride()
    out = empty_at_alone_alignment(t[0].shape, members, t, inner,
                                   t.data_ptr() % alignment_bytes(t) // t.element_size())
    return out.copy_(t)


def _overlaps(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether two elements of a tensor of `shape` and `strides` may share an address."""
    extent = 1
    for size, stride in sorted(zip(shape, strides, strict=True), key=lambda axis: axis[1]):
        if size > 1 and stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def empty_at_alone_alignment(shape: Sequence[int], members: int, like: Tensor,
                             strides: Sequence[int] | None = None, shift: int = 0) -> Tensor:
    """An empty (members, *shape) tensor of `like`'s dtype and device whose member blocks (dense, of
    `strides`: contiguous where None) start `shift` elements past a multiple of `alignment_bytes`, as a
    fresh tensor of `shape` does alone (shift 0)."""
    size, full_shape, full_strides = _alone_geometry(
        tuple(shape), members, None if strides is None else tuple(strides), shift,
        alignment_bytes(like) // like.element_size())
    if shift == 0:  # (a fresh tensor of those strides starts where its storage does: no view to make,
        # one aten call instead of two; a GEMM's padded output always, the copy of an operand mostly)
        return torch.empty_strided(full_shape, full_strides, dtype=like.dtype, device=like.device)
    storage = torch.empty(size, dtype=like.dtype, device=like.device)
    return storage.as_strided(full_shape, full_strides, shift)


@functools.cache
def _alone_geometry(shape: tuple[int, ...], members: int, strides: tuple[int, ...] | None, shift: int,
                    align: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """`empty_at_alone_alignment`'s storage size, shape and strides (`align` in elements), computed
    once a layout: a padded GEMM output asks for them at every call (3.6 us computed each time)."""
    inner = strides if strides is not None else _contiguous_strides(shape)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, inner, strict=True)) \
        if all(shape) else 0
    step = -(-extent // align) * align
    return shift + members * step, (members, *shape), (step, *inner)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def bmm_sums_as_mm(rows: int, reduction: int, columns: int) -> bool:
    """Whether a CPU bmm / baddbmm of batch entries (rows, reduction) @ (reduction, columns) sums each
    entry as that entry's own mm / addmm, bit for bit, at one thread: not below `SMALL_GEMM_MACS` (the
    loop's sums differ in the last bit from MKL's), nor where one of the three is 1 (MKL's batched GEMM
    then sums otherwise than the matrix-vector or rank-1 kernels its mm picks). Measured on torch 2.13
    + MKL 2024.2, every shape of 1-200 rows, reduction and columns (13 sizes each), each operand
    contiguous or transposed, with and without a bias: no difference where this holds; where it
    fails, differences in many layouts but not all (benchmarks/batched_sums.py, 17,960 shape-layouts,
    reductions up to 1024: the probe finds the batched call alike wherever this holds at one thread,
    and alike in 1,190 layouts this sends member by member: 740 reductions of 1, 115 of 2, 347 of
    400+ multiply-adds with a single row or column), so it errs on the safe side only. Not enough at two
    threads: there a bmm differs where this holds too (70 of the 17,960: 16 x 1024 x 64, 7 x 200 x
    200 with the second operand transposed), which the probe finds; nor on an AMD EPYC at one thread
    with members' operands or outputs off alone's alignment (module docstring): a probe backs it."""
    return rows * reduction * columns >= SMALL_GEMM_MACS and min(rows, reduction, columns) > 1


OutputLayouts = tuple[tuple[int, ...], ...]
"""The strides of each output of a member's own product alone (a probe's finding)."""

_DECIDED: dict[Hashable, tuple[bool, tuple[bool, ...]]] = {}
"""The answers in this process, by (site, library settings, the operands' layouts, how many of them
are brought to alone's alignment): whether the batched call sums as the members', and which operands
`at_alone_alignment` copies (a function of their layouts)."""

_MEMBER_LAYOUTS: dict[Hashable, OutputLayouts | None] = {}
"""`member_layouts`' answers by their decisions' keys: the strides of a member's own outputs alone
where the batched call is used, else None."""

PROBE_SEED = 20240917
"""The probes' random operands: the same in every process, so every process decides alike."""


CpuRule = bool | Callable[[], bool] | None
"""The established rule on the CPU (`bmm_sums_as_mm` of the product's shape; a callable: computed once
per layout), or None where there is none."""


def sums_as_members(site: Hashable, batched: Callable[..., Tensor], each: Callable[..., Tensor],
                    operands: Sequence[Tensor], cpu_rule: CpuRule = None) -> bool:
    """Whether `batched(*operands)` (operands with a leading member axis) gives, for every member g,
    bit for bit `each(*(o[g] for o in operands))` computed as the member computes it alone: on its
    operands at the addresses they have alone (`at_alone_alignment`). `site` names what `batched` and
    `each` compute (with any of their parameters not in the operands' layout). On the CPU a `cpu_rule`
    that fails decides alone (member by member); where it holds, a probe backs it at any thread count
    (batched only where both hold: the rule's products differ at any thread count, a probe on a
    product of a few output elements could pass one whose difference its data did not show, and the
    rule, measured on one CPU, failed on another: module docstring). Elsewhere the probe decides."""
    return aligned_sums_as_members(site, batched, each, operands, cpu_rule)[0]


def aligned_sums_as_members(site: Hashable, batched: Callable[..., Tensor], each: Callable[..., Tensor],
                            operands: Sequence[Tensor], cpu_rule: CpuRule = None, aligning: int = 0
                            ) -> tuple[bool, tuple[Tensor, ...]]:
    """`operands` with the first `aligning` of them at alone's alignment (`at_alone_alignment`), and
    whether `batched` of those sums as the members' own (`sums_as_members`). One decision a layout of
    `operands` as given (the copies' layouts follow from it): a decided call reads the settings and
    the layouts once (`_library_state`, `_layout`; a GEMM's key about 2 us on this CPU) and checks no
    operand's alignment again unless it must be copied."""
    first = operands[0]
    on_cpu = first.is_cpu
    if (on_cpu and cpu_rule is False) or _UNPROBED.get():
        rule = cpu_rule() if callable(cpu_rule) else cpu_rule
        return True if rule is None else rule, _aligned(operands, aligning)
    key = (site, _library_state(first), tuple(map(_layout, operands)), aligning)
    decision = _DECIDED.get(key)
    if decision is None:
        aligned = _aligned(operands, aligning)
        rule = (cpu_rule() if callable(cpu_rule) else cpu_rule) if on_cpu else None
        sums = False if rule is False else _probe(batched, each, aligned)
        _DECIDED[key] = (sums, tuple(copy is not o for copy, o in zip(aligned, operands, strict=True)))
        return sums, aligned
    sums, copies = decision
    if True not in copies:
        return sums, tuple(operands)
    return sums, tuple(at_alone_alignment(o) if copy else o for o, copy in zip(operands, copies, strict=True))


def member_layouts(site: Hashable, batched: Callable[..., Tensor | tuple[Tensor, ...]],
                   each: Callable[..., Tensor | tuple[Tensor, ...]],
                   operands: Sequence[Tensor]) -> OutputLayouts | None:
    """Where `batched(*operands)` gives every member g bit for bit `each(*(o[g] for o in operands))`
    as the member computes it alone (decided as `sums_as_members` decides without a rule: a probe per
    layout, with signed zeros too (`_probe_layouts`' `underflowing`); `decided` reports it), the
    strides of each of a member's own outputs alone (`each` may give several): a caller that stores
    the members' outputs in them hands later operations what each member hands them alone. None
    otherwise - the caller runs member by member - and under `unprobed`. Never timed: a choice by
    speed would follow the machine's load, and a grouped call alike on every probe is still another
    kernel, so the path, and with it any bit a probe missed, would not be the same seed's same
    result."""
    if _UNPROBED.get():
        return None
    key = (site, _library_state(operands[0]), tuple(map(_layout, operands)), 0)
    if key not in _DECIDED:
        layouts = _probe_layouts(batched, each, operands, underflowing=True)
        _DECIDED[key] = (layouts is not None, ())
        _MEMBER_LAYOUTS[key] = layouts
    return _MEMBER_LAYOUTS.get(key)


def _aligned(operands: Sequence[Tensor], aligning: int) -> tuple[Tensor, ...]:
    return tuple(at_alone_alignment(o) if i < aligning else o for i, o in enumerate(operands))


_UNPROBED: contextvars.ContextVar[bool] = contextvars.ContextVar("unprobed", default=False)


@contextlib.contextmanager
def unprobed() -> Iterator[None]:
    """Products decided by the rule alone (batched where there is none), nothing probed or kept: for
    a forward whose products only need to agree closely (`dse.train.stacked.stack_reason`'s check on
    two samples), whose layouts no run meets again."""
    token = _UNPROBED.set(True)
    try:
        yield
    finally:
        _UNPROBED.reset(token)


def _library_state(operand: Tensor) -> tuple[object, ...]:
    """Everything besides the operands' layouts that changes which kernel the library takes for a
    product (or how it sums) on `operand`'s device: the thread count, autocast (a user's network may
    run under it), the fp32 matmul precision (TF32 / bf16 on CUDA and oneDNN), reduced-precision
    reductions, deterministic algorithms, the BLAS library and cuBLAS's workspace, and MKL's
    reproducibility mode (`mkl_reproducibility`). Part of a decision's key, so that changing one
    decides again; torch tells nobody of a change, so each is read at every call, each by its
    cheapest read (on the CPU about 0.7 us in all: benchmarks/batched_sums.py --key-cost
    --key-parts). Settings a library reads once, when it starts, are fixed for the process, as the
    decisions are: MKL's instruction limit (MKL_ENABLE_INSTRUCTIONS), oneDNN's (ONEDNN_MAX_CPU_ISA /
    DNNL_MAX_CPU_ISA, ONEDNN_CPU_ISA_HINTS), oneDNN's default fp32 math mode
    (ONEDNN_DEFAULT_FPMATH_MODE; torch's own setting is `_onednn_fp32_precision`, here) and aten's
    kernel set (ATEN_CPU_CAPABILITY); no decision of a process can meet another value of them."""
    on_cpu = operand.is_cpu
    device_type = "cpu" if on_cpu else operand.device.type  # (`is_cpu` first: `device.type` 0.2 us a read)
    autocast = torch.is_autocast_enabled(device_type)
    # (torch's own getters' C functions, read directly: `torch.get_float32_matmul_precision` and
    # `torch.are_deterministic_algorithms_enabled` only return them)
    state = (torch.get_num_threads(), autocast, torch.get_autocast_dtype(device_type) if autocast else None,
             _setting(torch._C._get_float32_matmul_precision), torch._C._get_deterministic_algorithms(),
             _setting(_onednn_fp32_precision()), mkl_reproducibility() if on_cpu else None)
    if on_cpu:
        return state
    matmul = torch.backends.cuda.matmul
    return (*state, _setting(lambda: matmul.allow_tf32), _setting(lambda: matmul.fp32_precision),
            _setting(lambda: matmul.allow_fp16_reduced_precision_reduction),
            _setting(lambda: matmul.allow_bf16_reduced_precision_reduction),
            _setting(lambda: str(torch.backends.cuda.preferred_blas_library())),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"), os.environ.get("CUBLASLT_WORKSPACE_SIZE"))


MKL_CBWR_ALL = -1
"""`mkl_cbwr_get`'s argument for the whole mode: the branch and the STRICT flag."""

MKL_CBWR_ERR_MODE_CHANGE_FAILURE = -8
"""What `mkl_cbwr_set` answers once MKL has run (its mode is then fixed for the process), to any
argument: measured (torch 2.13, MKL 2024.2), before MKL's first computation a mode it does not know
answers MKL_CBWR_ERR_INVALID_INPUT (-2) and a known one is set (0); after it, -8, and the mode stays."""

_NO_MKL_MODE = 12345
"""A value that is no MKL_CBWR mode: `mkl_cbwr_set` of it asks whether MKL still takes a mode and sets
nothing (before MKL's first computation it fixes the mode from MKL_CBWR as a `mkl_cbwr_get` does:
measured, the variable set after it is not read)."""


@functools.cache
def _mkl_cbwr() -> tuple[Callable[[int], int], Callable[[int], int]] | None:
    """MKL's `mkl_cbwr_get` and `mkl_cbwr_set`, as torch's statically linked MKL exports them
    (`mkl_serv_cbwr_get`, `mkl_serv_cbwr_set`), or None where torch's BLAS is not MKL."""
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        read, write = library.mkl_serv_cbwr_get, library.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    read.argtypes, read.restype = [ctypes.c_int], ctypes.c_int
    write.argtypes, write.restype = [ctypes.c_int], ctypes.c_int
    return read, write


def mkl_reproducibility() -> int | str | None:
    """MKL's conditional numerical reproducibility mode (MKL_CBWR: COMPATIBLE, AVX2, ..., STRICT),
    which picks other kernels (a 16 x 1024 x 64 bmm's bits change under COMPATIBLE): read from MKL
    where it can be, else the variable as the process started (None: neither). MKL reads the variable
    once, at its first call; measured (torch 2.13, MKL 2024.2): setting it in os.environ later changes
    neither the mode nor a product's bits, and `mkl_cbwr_set` afterwards fails (-8) and keeps the mode.
    So once MKL refuses a change (`MKL_CBWR_ERR_MODE_CHANGE_FAILURE`) the mode is fixed for the
    process and is kept here, read no more (0.3 us a read through ctypes); until then it is read
    at every call. In a decision's key it guards a library that would let it change; where it
    matters is the one-thread rule, measured in MKL's own mode, and which a probe now backs in every
    mode (`sums_as_members`)."""
    global _mkl_mode_fixed
    if _mkl_mode_fixed is not None:
        return _mkl_mode_fixed
    mkl = _mkl_cbwr()
    if mkl is None:
        return _MKL_CBWR_AT_START
    read, write = mkl
    fixed = write(_NO_MKL_MODE) == MKL_CBWR_ERR_MODE_CHANGE_FAILURE  # (asked first: a mode read after
    mode = int(read(MKL_CBWR_ALL))                                    # it cannot change any more)
    if fixed:
        _mkl_mode_fixed = mode
    return mode


_mkl_mode_fixed: int | None = None
"""MKL's mode once MKL has fixed it (`mkl_reproducibility`)."""

_MKL_CBWR_AT_START = os.environ.get("MKL_CBWR")


@functools.cache
def _onednn_fp32_precision() -> Callable[[], object]:
    """A read of oneDNN's fp32 matmul precision (`torch.backends.mkldnn.matmul.fp32_precision`; "none"
    where this torch has no such setting): the getter that attribute calls, taken from it once
    (0.09 us a read against 0.56 through the attribute's `__getattr__`), else the attribute."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None:
        return lambda: "none"
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    where = vars(matmul) if hasattr(matmul, "__dict__") else {}
    if getter is not None and isinstance(where.get("backend"), str) and isinstance(where.get("op"), str):
        return functools.partial(getter, where["backend"], where["op"])
    return lambda: getattr(matmul, "fp32_precision", "none")


def _setting(read: Callable[[], object]) -> object:
    """A library setting, or the error reading it raises (torch refuses some reads after a mix of its
    legacy and new precision settings), as its value."""
    try:
        return read()
    except (AttributeError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"


def output_shape(product: Callable[..., Tensor], *operands: object) -> torch.Size:
    """The shape of `product(*operands)`, computed on meta tensors (nothing computed, no mode sees it)."""
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        return product(*(torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device="meta")
                         if isinstance(o, Tensor) else o for o in operands)).shape


def decided() -> dict[Hashable, bool]:
    """The layouts decided in this process and their answers (a copy)."""
    return {key: sums for key, (sums, _) in _DECIDED.items()}


def _layout(t: Tensor) -> tuple[object, ...]:
    """What of an operand a decision depends on: device, dtype, shape, strides, and its address modulo
    `alignment_bytes`, with that alignment (which operands `at_alone_alignment` copies depends on it:
    benchmarks/gpu_check.py sets the table to 4 to time a group without copies, in the same process)."""
    align = ALIGNMENT_BYTES["cpu" if t.is_cpu else "other"]  # (`alignment_bytes`, inlined: 3 reads a key)
    return (t.device, t.dtype, t.shape, t.stride(), t.data_ptr() % align, align)


PROBE_ELEMENTS = 4096
"""A probe draws random operands again until it has compared this many output elements (at most
`PROBE_DRAWS` draws): one draw of a product of a few elements (1 x 2 x 1) can sum alike by chance
(in 11 of 4480 shape-layouts of benchmarks/batched_sums.py --quick at one thread, each passing 1-11
of 20 fresh draws)."""

PROBE_DRAWS = 64


def _probe(batched: Callable[..., Tensor], each: Callable[..., Tensor], operands: Sequence[Tensor]) -> bool:
    """Whether `batched` gives each member's `each`, bit for bit, on random operands of `operands`'
    layout (`_probe_layouts`)."""
    return _probe_layouts(batched, each, operands) is not None


def _probe_layouts(batched: Callable[..., Tensor | tuple[Tensor, ...]],
                   each: Callable[..., Tensor | tuple[Tensor, ...]],
                   operands: Sequence[Tensor], underflowing: bool = False) -> OutputLayouts | None:
    """Where `batched` gives each member's `each`, bit for bit, on random operands of `operands`'
    layout (each output of several: a tuple), the strides of member 0's own outputs; else None.
    `underflowing`: one more draw scaled so that every product underflows to a signed zero, whose
    sums' signs show how a kernel starts them (normal operands never sum to zero). It
    holds those operands, the batched output and one member's output at a time beside the run's own
    tensors (in a transformer proxy group of 32, int8, batch 64, 2 threads, at most 28 MiB, its FFN's
    forward baddbmm; comparing every member's output at once, as before, held three outputs: 67 MiB),
    and frees them before the run goes on: measured, a group's peak is the same with its probes as
    without (dse/train/memory.py)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    compared = draws = 0
    layouts: OutputLayouts | None = ()
    with torch.no_grad(), _disable_current_modes(), torch._C.DisableTorchFunction():
        while layouts is not None and compared < PROBE_ELEMENTS and draws < PROBE_DRAWS:
            layouts, outputs = _draw_layouts(batched, each, operands, generator, 1.0)
            compared, draws = compared + max(1, outputs), draws + 1
        if layouts is not None and underflowing:
            layouts, _ = _draw_layouts(batched, each, operands, generator,
                                       _underflowing_scale(operands[0].dtype))
    return layouts


def _draw_layouts(batched: Callable[..., Tensor | tuple[Tensor, ...]],
                  each: Callable[..., Tensor | tuple[Tensor, ...]], operands: Sequence[Tensor],
                  generator: torch.Generator, scale: float) -> tuple[OutputLayouts | None, int]:
    """One draw of `_probe_layouts` (random operands x `scale`): member 0's output strides where every
    member's output agrees (else None), and how many output elements were compared."""
    probe = [_random_like(t, generator, scale) for t in operands]
    together = _outputs(batched(*probe))
    members = operands[0].shape[0]
    if any(t.dim() == 0 or t.shape[0] != members for t in together):
        return None, 0
    alone = [at_alone_alignment(t) for t in probe]
    layouts: OutputLayouts = ()
    for g in range(members):  # one member's output at a time: the probe's memory stays small
        own = _outputs(each(*(t[g] for t in alone)))
        if len(own) != len(together) or not all(_same_bits(t[g], o)
                                                for o, t in zip(own, together, strict=True)):
            return None, 0
        if g == 0:
            layouts = tuple(o.stride() for o in own)
    return layouts, sum(t.numel() for t in together)


def _underflowing_scale(dtype: torch.dtype) -> float:
    """A power of two that brings normal random operands of `dtype` so low that each product of two
    underflows to a signed zero (fp32: 2^-83, products near 2^-166 below the least subnormal 2^-149)."""
    least_exponent = math.floor(math.log2(torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps))
    return 2.0 ** (least_exponent // 2 - 8)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.numel() == b.numel() and torch.equal(_bits(a.reshape(-1)), _bits(b.reshape(-1)))


def _outputs(result: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (result,) if isinstance(result, Tensor) else tuple(result)


def _random_like(t: Tensor, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """Normal random values (x `scale`) in `t`'s device, dtype, shape, strides and address modulo
    `alignment_bytes(t)` (an expanded operand stays expanded)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) \
        if t.numel() else 0
    shift = t.data_ptr() % alignment_bytes(t) // t.element_size()
    storage = (torch.randn(extent + shift, generator=generator) * scale).to(device=t.device, dtype=t.dtype)
    return storage.as_strided(tuple(t.shape), t.stride(), shift)


def _bits(t: Tensor) -> Tensor:
    """t's bits (so that -0.0 and 0.0, or two NaNs, compare by their encodings)."""
    return t.contiguous().view(torch.uint8)
