"""A group's GEMM decision (dse/train/batched_sums.py) is made once a layout and settings and kept, so
a decided call must still see every change of what it depends on: torch tells nobody of a setting's
change, so `_library_state` reads each at every call (its cheap reads must read what torch's own
attributes read), MKL's reproducibility mode is kept only once MKL refuses to change it, and a
decided call still brings each member's operands to their alignment alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from support.group_gemms import gemm_operands, torch_threads

from dse.train import batched_sums
from dse.train.stacked import _own_gemm, member_gemm


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """An empty decision cache, and the count of probes run since (one entry a probe)."""
    monkeypatch.setattr(batched_sums, "_DECIDED", {})
    seen: list[int] = []
    probe = batched_sums._probe

    def counted(*args: Any) -> bool:
        seen.append(1)
        return probe(*args)

    monkeypatch.setattr(batched_sums, "_probe", counted)
    return seen


def _ops() -> tuple[torch.Tensor, ...]:
    """A Linear's forward operands for 3 members, a product the rule holds for (16 x 64 x 32)."""
    return gemm_operands(3, 16, 64, 32, False, True, True, torch.Generator().manual_seed(0))


@contextmanager
def _threads_two() -> Iterator[None]:
    with torch_threads(2):
        yield


@contextmanager
def _matmul_precision_medium() -> Iterator[None]:
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@contextmanager
def _onednn_bf16() -> Iterator[None]:
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


@contextmanager
def _deterministic() -> Iterator[None]:
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


@contextmanager
def _autocast_bf16() -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield


SETTINGS: dict[str, Callable[[], Any]] = {
    "set_num_threads": _threads_two, "set_float32_matmul_precision": _matmul_precision_medium,
    "mkldnn.matmul.fp32_precision": _onednn_bf16, "use_deterministic_algorithms": _deterministic,
    "autocast": _autocast_bf16}


@pytest.mark.parametrize("change", list(SETTINGS), ids=list(SETTINGS))
def test_a_setting_changed_between_two_calls_is_decided_anew_and_changed_back_is_not(
        change: str, probes: list[int]) -> None:
    """member_gemm decides a layout once (one probe) and keeps it; a setting changed between two calls
    makes the next call decide again (a probe), and the setting changed back finds its first decision
    (no probe; torch's `set_float32_matmul_precision` back to "highest" leaves oneDNN's precision
    "ieee" where it was "none", another state, decided once more): the settings are read at each
    call, not cached."""
    ops = _ops()
    with torch_threads(1):
        first = batched_sums._library_state(ops[0])
        member_gemm(*ops)
        member_gemm(*ops)
        assert len(probes) == 1
        with SETTINGS[change]():
            member_gemm(*ops)
            assert len(probes) == 2
            member_gemm(*ops)
            assert len(probes) == 2
        member_gemm(*ops)
        member_gemm(*ops)
        assert len(probes) == (2 if batched_sums._library_state(ops[0]) == first else 3)


@pytest.mark.parametrize("variant", ["one element further", "transposed", "float64", "more rows"])
def test_an_operand_layout_as_given_is_decided_on_its_own(variant: str, probes: list[int]) -> None:
    """The key is each operand's layout as the caller gives it (device, dtype, shape, strides, address
    modulo the alignment): another of any of these is decided again, once."""
    a, b, bias = _ops()
    if variant == "one element further":
        a = torch.randn(a.numel() + 1)[1:].view(a.shape)
    elif variant == "transposed":
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    elif variant == "float64":
        a, b, bias = a.double(), b.double(), bias.double()
    else:
        a = torch.randn(3, 17, 64)
    with torch_threads(1):
        member_gemm(*_ops())
        assert len(probes) == 1
        member_gemm(a, b, bias)
        member_gemm(a, b, bias)
        assert len(probes) == 2


def _at_alignment(t: torch.Tensor) -> torch.Tensor:
    storage = torch.empty(t.numel())
    return storage.as_strided(t.shape, torch.empty_like(t).stride()).copy_(t)


def test_a_decided_call_still_gives_misaligned_members_their_alignment_alone(probes: list[int]) -> None:
    """A group's contiguous (3, 50, 37) input puts its members 7400 bytes apart, 8 past a 16-byte
    boundary, where MKL sums a member's (50, 37) @ (37, 10) otherwise: the second call, decided, copies
    them to alone's alignment as the first did, and every member's product equals its own on fresh
    operands, bit for bit, each time (a decided call that took them as given differed, on this
    session's AMD EPYC)."""
    rows, reduction, columns, members = 50, 37, 10, 3
    x = torch.randn(members, rows, reduction)
    w = torch.randn(members, columns, reduction)
    with torch_threads(1):
        for _ in range(2):
            together = member_gemm(x, w.transpose(1, 2))
            for g in range(members):
                alone = _own_gemm(_at_alignment(x[g]), _at_alignment(w[g]).t())
                assert torch.equal(together[g].view(torch.int32), alone.contiguous().view(torch.int32))
    assert len(probes) == 1


def test_the_onednn_precision_read_is_what_torchs_attribute_reads() -> None:
    """`_library_state` reads oneDNN's fp32 matmul precision through the getter its attribute calls
    (6x cheaper): for every value torch takes, the two agree."""
    read = batched_sums._onednn_fp32_precision()
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    try:
        for value in ("bf16", "tf32", "ieee", "none"):
            matmul.fp32_precision = value
            assert read() == matmul.fp32_precision == value
    finally:
        matmul.fp32_precision = saved


MKL_MODE_IN_A_FRESH_PROCESS = """
from dse.train import batched_sums
read, write = batched_sums._mkl_cbwr()
first = batched_sums.mkl_reproducibility()
assert write(3) == 0  # MKL_CBWR_COMPATIBLE: MKL has not run, it still takes a mode
changed = batched_sums.mkl_reproducibility()
kept_before = batched_sums._mkl_mode_fixed
import torch
torch.randn(16, 64) @ torch.randn(64, 16)
after = batched_sums.mkl_reproducibility()
print(first, changed, kept_before, after, batched_sums._mkl_mode_fixed, write(1))
"""


def test_mkls_mode_is_kept_only_once_mkl_refuses_to_change_it() -> None:
    """In a fresh process MKL takes another mode until its first computation: read before, the mode
    is read again (the change is seen, nothing kept); after a GEMM MKL refuses a change (-8) and the
    mode is kept."""
    if batched_sums._mkl_cbwr() is None:
        pytest.skip("torch's BLAS is not MKL")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", MKL_MODE_IN_A_FRESH_PROCESS], capture_output=True,
                          text=True, check=True, env=env)
    first, changed, kept_before, after, kept, refused = done.stdout.split()
    assert (changed, kept_before, after, kept, refused) == ("3", "None", "3", "3", "-8"), done.stdout
    assert first != "3"


def test_a_decision_is_per_alignment_table(probes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Which operands a decided call copies depends on `ALIGNMENT_BYTES` (benchmarks/gpu_check.py sets
    it to 4 in the process that decided at 64, to time a group without copies): the same operands
    are decided again under another table, and copied only where that table says."""
    a = torch.randn(3, 50, 37)  # members 7400 bytes apart: off 64, a multiple of 4
    b = torch.randn(3, 37, 16)  # members 2368 bytes apart: on 64
    site = ("per-alignment-table",)
    with torch_threads(1):
        _, copied = batched_sums.aligned_sums_as_members(site, torch.bmm, torch.mm, (a, b), True, aligning=2)
        assert copied[0] is not a and copied[1] is b
        monkeypatch.setitem(batched_sums.ALIGNMENT_BYTES, "cpu", 4)
        for _ in range(2):
            _, given = batched_sums.aligned_sums_as_members(site, torch.bmm, torch.mm, (a, b), True,
                                                            aligning=2)
            assert given[0] is a and given[1] is b
    assert len(probes) == 2


def _at_offset(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """`t`'s values, contiguous, starting `offset_bytes` past a 64-byte boundary in memory numpy
    allocated (16-byte aligned): a storage of its own, at storage offset 0, whose address is off."""
    memory = np.empty(t.numel() + 16, dtype=np.float32)
    start = (offset_bytes - memory.ctypes.data) % 64 // memory.itemsize
    return torch.from_numpy(memory[start:start + t.numel()]).view(t.shape).copy_(t)


@pytest.mark.parametrize("offset_bytes", range(0, 64, 4))
def test_a_decided_call_keeps_each_member_where_it_is_alone_at_any_base_address(
        offset_bytes: int, probes: list[int]) -> None:
    """The copies a decided call makes follow from the key (the operand's address modulo the alignment
    is in it, not its storage offset): a group's input starting anywhere off a 64-byte boundary gives
    each member, decided or not, the product the member computes alone on its input at that address
    (member 0 where the group starts, alone's tensor where the group's does), bit for bit; a base at
    0 decided first does not answer for it."""
    rows, reduction, columns, members = 50, 37, 10, 3
    x = torch.randn(members, rows, reduction, generator=torch.Generator().manual_seed(offset_bytes))
    w = torch.randn(members, reduction, columns, generator=torch.Generator().manual_seed(1))
    with torch_threads(1):
        member_gemm(_at_offset(x, 0), w)
        for _ in range(2):
            given = _at_offset(x, offset_bytes)
            assert given.data_ptr() % 64 == offset_bytes and given.storage_offset() == 0
            together = member_gemm(given, w)
            for g in range(members):
                alone = _own_gemm(_at_offset(x[g], offset_bytes), _at_alignment(w[g]))
                assert torch.equal(together[g].view(torch.int32), alone.contiguous().view(torch.int32))
    assert len(probes) == (1 if offset_bytes == 0 else 2)


PRODUCTS_IN_A_FRESH_PROCESS = """
import sys
import torch
if sys.argv[1] == "asked":
    from dse.train import batched_sums
    batched_sums.mkl_reproducibility()  # before MKL's first computation: mkl_cbwr_set of no mode
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
a, b = torch.randn(16, 1024, 64, generator=generator), torch.randn(16, 64, 1024, generator=generator)
outs = [torch.bmm(a, b), a[0] @ b[0], torch.randn(50, 37, generator=generator) @ b[0, :37, :10]]
print(torch.cat([o.reshape(-1) for o in outs]).view(torch.int32).sum(dtype=torch.int64).item(),
      torch.cat([o.reshape(-1) for o in outs]).view(torch.int32)[::997].tolist())
"""


@pytest.mark.parametrize("mode", [None, "COMPATIBLE"])
def test_asking_mkls_mode_before_it_runs_changes_no_products_bits(mode: str | None) -> None:
    """dse asks MKL whether its mode is fixed (`mkl_cbwr_set` of no mode) at a group's first GEMM,
    possibly before MKL's first computation: a fresh process's products are bit for bit those of one
    that never asked, under MKL's own mode and under MKL_CBWR=COMPATIBLE (whose kernels differ)."""
    if batched_sums._mkl_cbwr() is None:
        pytest.skip("torch's BLAS is not MKL")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | ({"MKL_CBWR": mode} if mode else {})
    bits = [subprocess.run([sys.executable, "-c", PRODUCTS_IN_A_FRESH_PROCESS, asked], capture_output=True,
                           text=True, check=True, env=env).stdout for asked in ("never", "asked")]
    assert bits[0] == bits[1]
