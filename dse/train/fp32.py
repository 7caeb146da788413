"""fp32 arithmetic in IEEE fp32 for a run, on every backend, and the caller's precision settings back.

torch lets fp32 GEMMs run otherwise: cuDNN convolutions in TF32 by default
(`torch.backends.cudnn.allow_tf32`), cuBLAS matmuls in TF32 and CPU matmuls through oneDNN in its bf16
math mode where a caller asked (`torch.set_float32_matmul_precision("high" / "medium")`, or the
per-backend `fp32_precision` settings). A run's fp32 baseline and its fake-quantized GEMMs (quantized
values multiplied in fp32) must be fp32, or the numbers of a design-space exploration are off
silently. On this AMD EPYC (avx512_bf16) "medium" changed the bits of a (64, 300) @ (300, 50) product:
largest error against fp64 4.1e-5 where MKL's fp32 gave 1.9e-5 (bf16 operands would give 0.15, so
oneDNN does not simply round the operands to bf16 here, but it is not the run's fp32 arithmetic).

torch keeps two sets of settings (a legacy one, and the per-backend `fp32_precision` tree: generic ->
cuda / mkldnn "all" -> matmul / conv / rnn, where "none" means "as the level above"); reading a legacy
flag after the two disagree raises. A run sets the tree level by level: the generic level to IEEE,
then only the levels that still read otherwise (the caller set them explicitly), so each comes back
exactly, in reverse order, and a level that followed the one above it follows it again. The legacy
matmul precision (which cuBLAS's TF32 check compares with the tree) is then set to "highest" and put
back first on the way out wherever it reads otherwise then (a user's model may have set it during the
run: left so, it would disagree with the tree and be unreadable); a matmul level it wrote over gets
the caller's value again. A tree level that the run's own code set, where the run did not, stays as
that code left it (torch has no setting for "as torch started"). The legacy cuDNN
flag is left alone: torch's kernels read the tree per operation, and turning the flag off would lose
torch's initial cuDNN setting (follow the levels above, else the flag), which no setting writes back.
So inside a run `torch.backends.cudnn.allow_tf32` refuses to be read where the caller left it on, as
torch refuses any reading of it that disagrees with the tree; `torch.backends.cudnn.flags(...)` reads
it, so a user's model that enters it fails inside a run (no dse code reads it). Torch's convolution
hands cuDNN `allowTF32CuDNN(CONV)`, the tree's conv level (traced, it reads False inside a run)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

Level = tuple[str, str]
"""A level of torch's fp32 precision tree: (backend, operation), e.g. ("cuda", "conv")."""

LEVELS: tuple[Level, ...] = (("cuda", "all"), ("mkldnn", "all"),
                             ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
                             ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
"""The tree below the generic level, each level after the one it follows."""


def precision(level: Level) -> str:
    """The precision a level reads (its own setting, or that of the level it follows)."""
    return str(torch._C._get_fp32_precision_getter(*level))


def _set_precision(level: Level, value: str) -> None:
    torch._C._set_fp32_precision_setter(*level, value)


def _legacy_matmul_precision() -> str | None:
    """`torch.get_float32_matmul_precision()`, None where torch refuses it (it disagrees with the tree)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def has_precision_tree() -> bool:
    """Whether this torch has the per-backend `fp32_precision` tree (torch 2.9 on; dse admits 2.2)."""
    return hasattr(torch._C, "_get_fp32_precision_getter")


def ieee_fp32() -> contextlib.AbstractContextManager[None]:
    """fp32 matmuls, convolutions and RNNs in IEEE fp32 on CUDA and oneDNN; the caller's settings back
    afterwards (module docstring), through the tree where torch has one, else the legacy flags."""
    return _ieee_tree() if has_precision_tree() else _ieee_legacy()


@contextlib.contextmanager
def _ieee_legacy() -> Iterator[None]:
    """A torch without the tree has only the legacy settings, each a plain value written back as read:
    the matmul precision (cuBLAS's TF32 and oneDNN's bf16 mode) and cuDNN's TF32 flag."""
    cudnn = torch.backends.cudnn
    matmul, cudnn_tf32 = torch.get_float32_matmul_precision(), cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        cudnn.allow_tf32 = cudnn_tf32


@contextlib.contextmanager
def _ieee_tree() -> Iterator[None]:
    read_before = {level: precision(level) for level in LEVELS}
    changed: list[tuple[Level, str]] = [(("generic", "all"), precision(("generic", "all")))]
    _set_precision(("generic", "all"), "ieee")
    for level in LEVELS:
        if precision(level) != "ieee":
            changed.append((level, precision(level)))
            _set_precision(level, "ieee")
    matmul = torch.get_float32_matmul_precision()  # readable: no matmul level reads TF32 or bf16 now
    if matmul != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if _legacy_matmul_precision() != matmul:  # the run's own code (a user's model) may have set it
            torch.set_float32_matmul_precision(matmul)
        for level, value in reversed(changed):
            _set_precision(level, value)
        for level, value in read_before.items():  # a matmul level the legacy setter wrote over
            if precision(level) != value:
                _set_precision(level, value)
