"""A group's batched products sum each member's as the member's own at any thread count and on any
device (dse/train/batched_sums.py): on the CPU the rule `bmm_sums_as_mm` sends what it fails member by
member and a probe backs it where it holds, at any thread count; on a GPU a probe decides; each member's
operands and output are at their alignment alone; a grouped run then equals each member's run alone,
bit for bit, at two threads as at one."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.aten_calls import AtenCalls
from support.group_gemms import gemm_operands, torch_threads

from dse.train import TrainConfig, accumulation, batched_sums
from dse.train.batched_sums import bmm_sums_as_mm, sums_as_members
from dse.train.stacked import _batched_gemm, _matmul_with_grads, _own_gemm, member_gemm

MODELS = "tests/support/user_models.py"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _operands(members: int, rows: int, reduction: int, columns: int, a_transposed: bool, b_transposed: bool,
              bias: bool, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return gemm_operands(members, rows, reduction, columns, a_transposed, b_transposed, bias,
                         torch.Generator().manual_seed(seed), device)


def _each_own(ops: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Each member's own product on its operands at their alignment alone (a fresh tensor's)."""
    return torch.stack([_own_gemm(*(_aligned_copy(o[g]) for o in ops)) for g in range(ops[0].shape[0])])


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.equal(x.contiguous().view(torch.int32),
                                              y.contiguous().view(torch.int32))


# --- the decision -----------------------------------------------------------------------------------


@pytest.fixture
def no_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty decision cache for a test that asserts what gets decided: decisions last the process
    (`batched_sums._DECIDED`), and a test run before may have decided the same layout (a grouped MLP
    step of 3 members at one thread decides this file's 3 x 64 x 64 x 128 baddbmm)."""
    monkeypatch.setattr(batched_sums, "_DECIDED", {})


@pytest.mark.parametrize(("rows", "reduction", "columns"), [(64, 64, 128), (4, 8, 4), (64, 1, 32)])
def test_at_one_thread_a_failing_rule_decides_and_a_holding_one_is_probed(
        rows: int, reduction: int, columns: int, no_decisions: None) -> None:
    """At one thread `bmm_sums_as_mm` sends a product it fails member by member without a probe (each
    member's addmm, nothing decided); one it holds for is probed, as at more threads (the rule,
    measured on one CPU, failed on another: 2 x k x 37 and 7 x k x 10 products), and the group's
    product is each member's own either way."""
    ops = _operands(3, rows, reduction, columns, False, True, True, seed=0)
    with torch_threads(1):
        key = ("baddbmm", batched_sums._library_state(ops[0]),  # the operands are at alone's alignment
               tuple(batched_sums._layout(t) for t in ops), 2)  # (member_gemm aligns a and b)
        with AtenCalls() as seen:
            together = member_gemm(*ops)
    products = [name for name in seen.names if name.endswith(("mm", "bmm"))]
    rule = bmm_sums_as_mm(rows, reduction, columns)
    assert products in ([["aten::baddbmm"], ["aten::addmm"] * 3] if rule else [["aten::addmm"] * 3])
    assert list(batched_sums.decided()) == ([key] if rule else [])  # this call's probe, the cache empty
    assert _same_bits(together, _each_own(ops))


def _aligned_copy(t: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """A copy of `t` (same strides where dense) at `shift` elements past a 64-byte boundary: where a
    member's fresh tensor (shift 0) is alone."""
    storage = torch.empty(t.numel() + shift)
    copy = storage.as_strided(t.shape, torch.empty_like(t).stride(), shift)
    return copy.copy_(t)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(50, 37, 10), (7, 37, 10), (2, 16, 37), (64, 64, 10), (100, 256, 10),
                              (16, 64, 64)]),
       padding=st.integers(0, 15), members=st.integers(2, 4), bias=st.booleans(),
       thread_count=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_a_groups_gemm_at_any_member_misalignment_is_each_members_own_at_its_alignment_alone(
        shape: tuple[int, int, int], padding: int, members: int, bias: bool, thread_count: int,
        seed: int) -> None:
    """Members' blocks `padding` floats past their rows x features apart (member g at g x (block +
    padding) x 4 bytes modulo 64: every misalignment for some member) give each member the product its
    aligned operands give alone. MKL's sgemm on an AMD EPYC sums a (50, 37) @ (37, 10) product at 8
    bytes past 16 otherwise than at 16 (215 of 500 outputs), and a bmm's output blocks 7 x 10 floats
    apart otherwise than a member's fresh output."""
    rows, reduction, columns = shape
    source = torch.Generator().manual_seed(seed)
    block = rows * reduction + padding
    x = torch.randn(members * block, generator=source).as_strided((members, rows, reduction),
                                                                  (block, reduction, 1))
    w = torch.randn(members, columns, reduction, generator=source)
    b = torch.randn(members, columns, generator=source) if bias else None
    with torch_threads(thread_count):
        together = member_gemm(x, w.transpose(1, 2), b)
        for g in range(members):
            alone = torch.nn.functional.linear(_aligned_copy(x[g]), _aligned_copy(w[g]),
                                               None if b is None else _aligned_copy(b[g]))
            assert _same_bits(together[g], alone), g


@pytest.mark.parametrize(("rows", "reduction", "columns"), [(50, 37, 10), (50, 37, 9), (7, 37, 10)])
def test_a_groups_accumulated_gemm_at_any_member_misalignment_is_each_members_own(
        rows: int, reduction: int, columns: int) -> None:
    """The accumulation emulation's chunks of misaligned members (a Linear's forward x W^T: fp16 sums
    in chunks of 16 over the 37 inputs) fold as each member's own on its operands at their alignment
    alone. The weight is taken transposed, as a Linear takes it: MKL on an AMD EPYC sums a chunk
    x[:, s:s+16] @ W^T[s:s+16] otherwise where x's block starts off 16 bytes, and a chunk of an
    untransposed (37, 10) operand alike at any offset (0 of 15 offsets differ), so with b untransposed
    this test passed without the alignment step. With `at_alone_alignment` left out of `fold_gemm`:
    7 of the 144 member blocks differed (paddings 7, 9, 15 of 50 x 37 x 10, 4, 7, 15 of x 9, 10 of 7 x
    37 x 10)."""
    from dse.formats import get
    from dse.formats.base import MemberGenerators
    from dse.train.policy import TensorQuant
    from dse.train.stacked import _accumulator

    quant = TensorQuant(get("fp16"))
    source = torch.Generator().manual_seed(11)
    for padding in range(16):
        block = rows * reduction + padding
        a = torch.randn(3 * block, generator=source).as_strided((3, rows, reduction), (block, reduction, 1))
        b = torch.randn(3, columns, reduction, generator=source).transpose(1, 2)
        stacked_acc = _accumulator(quant, 16, MemberGenerators([torch.Generator() for _ in range(3)]))
        assert stacked_acc is not None
        with torch_threads(1):
            folded = accumulation.matmul_forward(a, b, stacked_acc)
            for g in range(3):
                alone = accumulation.matmul_forward(_aligned_copy(a[g]), _aligned_copy(b[g]),
                                                    accumulation.Accumulator(quant, 16))
                assert _same_bits(folded[g], alone), (padding, g)


@pytest.mark.parametrize(("rows", "reduction", "columns", "b_transposed"), [
    (16, 1024, 64, False), (7, 200, 200, True), (64, 64, 128, False)])
def test_at_two_threads_the_probe_answers_as_the_batched_product_sums(
        rows: int, reduction: int, columns: int, b_transposed: bool) -> None:
    """At two threads torch's bmm runs each batch entry's GEMM on one thread, a member's mm splits a
    long reduction among them: 16 x 1024 x 64 and 7 x 200 x 200 (b transposed) differ on the
    machine this was written on (torch 2.13, MKL 2024.2), where `bmm_sums_as_mm` holds. Whatever this
    machine's kernels do, the probe answers as the batched product sums on fresh operands, and the
    group computes each member's own product."""
    assert bmm_sums_as_mm(rows, reduction, columns)
    with torch_threads(2):
        draws = [_operands(3, rows, reduction, columns, False, b_transposed, False, seed=s) for s in range(3)]
        alike = all(_same_bits(_batched_gemm(*ops), _each_own(ops)) for ops in draws)
        assert sums_as_members(("answers", rows), _batched_gemm, _own_gemm, draws[0], True) == alike
        assert _same_bits(member_gemm(*draws[0]), _each_own(draws[0]))


@settings(max_examples=25, deadline=None)
@given(members=st.integers(2, 4), rows=st.sampled_from([1, 2, 5, 16, 64]),
       reduction=st.sampled_from([1, 3, 16, 100, 320, 1024]), columns=st.sampled_from([1, 2, 10, 64, 513]),
       a_transposed=st.booleans(), b_transposed=st.booleans(), bias=st.booleans(),
       thread_count=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_a_groups_gemm_is_each_members_own_at_any_thread_count(
        members: int, rows: int, reduction: int, columns: int, a_transposed: bool, b_transposed: bool,
        bias: bool, thread_count: int, seed: int) -> None:
    ops = _operands(members, rows, reduction, columns, a_transposed, b_transposed, bias, seed)
    with torch_threads(thread_count):
        assert _same_bits(member_gemm(*ops), _each_own(ops))


@pytest.mark.parametrize("rows, reduction, columns", [(1, 2, 1), (1, 3, 1), (2, 3, 2), (1, 64, 1)])
def test_a_probe_of_a_product_of_few_elements_draws_until_it_sees_a_difference(
        rows: int, reduction: int, columns: int) -> None:
    """One random draw of a 1 x 2 x 1 product summed alike by chance in a third of draws (torch's own
    loop against MKL's mm, on the machine this was written on); the probe compares 4096 output
    elements before it answers, so it answers as 40 fresh draws do."""
    ops = _operands(3, rows, reduction, columns, False, False, False, seed=2)
    with torch_threads(1):
        draws = (_operands(3, rows, reduction, columns, False, False, False, seed=s) for s in range(40))
        alike = all(_same_bits(_batched_gemm(*o), _each_own(o)) for o in draws)
        assert sums_as_members(("few", rows, reduction, columns), _batched_gemm, _own_gemm, ops) == alike


def test_a_probe_leaves_the_runs_generators_grad_and_modes_alone() -> None:
    """A probe draws from its own generator, outside autograd and any torch mode: the run's random
    streams, its graph and a mode watching it see only the product itself."""
    ops = tuple(t.requires_grad_() for t in _operands(2, 32, 1024, 16, False, True, False, seed=3))
    rng = torch.get_rng_state()
    with torch_threads(2), AtenCalls() as seen:
        y = member_gemm(*ops)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [n for n in seen.names if "mm" in n] in (["aten::bmm"], ["aten::mm", "aten::mm"])
    y.sum().backward()
    assert all(t.grad is not None for t in ops)


def _differs_at_two_threads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A batched product that is each member's own at one thread and sums the reduction in reverse
    order at more: it differs from the members' own products at two threads on any CPU (a real bmm's
    difference there is the machine's: 16 x 1024 x 64 differed on the AVX-512 VM of session 12, not on
    the AMD EPYC of session 13)."""
    if torch.get_num_threads() > 1:
        return torch.bmm(a.flip(-1), b.flip(-2))
    return torch.stack([_own_gemm(a[g], b[g]) for g in range(a.shape[0])])


def test_a_decision_is_per_thread_count() -> None:
    """A layout decided at two threads is decided again at one, never taken over."""
    ops = _operands(2, 16, 1024, 64, False, False, False, seed=4)
    with torch_threads(2):
        assert not sums_as_members(("per-threads",), _differs_at_two_threads, _own_gemm, ops, True)
    with torch_threads(1):
        assert sums_as_members(("per-threads",), _differs_at_two_threads, _own_gemm, ops, True)


@contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _new_sites(before: dict[Any, bool]) -> list[Any]:
    return [key[0] for key in batched_sums.decided() if key not in before]


def test_a_decision_is_per_matmul_precision() -> None:
    """`torch.set_float32_matmul_precision("medium")` runs fp32 matmuls in bf16 through oneDNN on the
    CPU (TF32 on CUDA): another kernel, so a layout decided at "highest" is decided again, never
    taken over; and at one thread, where the rule was measured with fp32 matmuls only, it is probed."""
    ops = _operands(2, 16, 256, 64, False, False, False, seed=4)
    with torch_threads(2):
        sums_as_members(("per-precision",), _batched_gemm, _own_gemm, ops, True)
        before = batched_sums.decided()
        with _matmul_precision("medium"):
            answer = sums_as_members(("per-precision",), _batched_gemm, _own_gemm, ops, True)
            assert answer == _same_bits(_batched_gemm(*ops), _each_own(ops))
        assert _new_sites(before) == [("per-precision",)]
    with torch_threads(1), _matmul_precision("medium"):
        before = batched_sums.decided()
        sums_as_members(("one-thread-medium",), _batched_gemm, _own_gemm, ops, True)
        assert _new_sites(before) == [("one-thread-medium",)]
        with AtenCalls() as seen:  # the group's product equals each member's own under bf16 too
            together = member_gemm(*ops)
        assert _same_bits(together, _each_own(ops)) and seen.names


def test_a_decision_is_per_mkl_reproducibility_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL_CBWR (COMPATIBLE, AVX2, ...) makes MKL take other kernels: a layout decided in MKL's own
    mode is decided again in another, and at one thread, where the rule was measured in MKL's own
    mode, it is probed."""
    ops = _operands(2, 16, 256, 64, False, False, False, seed=4)
    with torch_threads(2):
        sums_as_members(("per-cbwr",), _batched_gemm, _own_gemm, ops, True)
    before = batched_sums.decided()
    monkeypatch.setattr(batched_sums, "mkl_reproducibility", lambda: 3)  # MKL_CBWR_COMPATIBLE
    with torch_threads(2):
        sums_as_members(("per-cbwr",), _batched_gemm, _own_gemm, ops, True)
    with torch_threads(1):
        sums_as_members(("one-thread-cbwr",), _batched_gemm, _own_gemm, ops, True)
    assert _new_sites(before) == [("per-cbwr",), ("one-thread-cbwr",)]


@pytest.mark.parametrize("mode, expected", [(None, 1), ("COMPATIBLE", 3)])
def test_mkl_reproducibility_is_the_mode_mkl_runs_in(mode: str | None, expected: int) -> None:
    """Read from MKL (torch's own, statically linked), in a process started with MKL_CBWR or without:
    COMPATIBLE is MKL_CBWR_COMPATIBLE (3), none MKL_CBWR_BRANCH_OFF (1)."""
    import os
    import subprocess
    import sys

    if batched_sums._mkl_cbwr() is None:
        pytest.skip("torch's BLAS is not MKL")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | ({"MKL_CBWR": mode} if mode else {})
    code = "from dse.train.batched_sums import mkl_reproducibility; print(mkl_reproducibility())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) == expected


def test_a_decision_is_per_autocast() -> None:
    """A user's network under `torch.autocast` runs its products in bf16 (another kernel): a layout
    decided outside is decided again inside, at one thread too (the rule was measured in fp32), and
    the group's product is each member's own there."""
    ops = _operands(2, 16, 256, 64, False, False, False, seed=4)
    for thread_count in (2, 1):
        with torch_threads(thread_count):
            sums_as_members(("per-autocast", thread_count), _batched_gemm, _own_gemm, ops, True)
            before = batched_sums.decided()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sums_as_members(("per-autocast", thread_count), _batched_gemm, _own_gemm, ops, True)
                together, alone = member_gemm(*ops), _each_own(ops)
            assert _new_sites(before)[:1] == [("per-autocast", thread_count)]
            assert together.dtype == torch.bfloat16
            assert torch.equal(together.view(torch.int16), alone.view(torch.int16))


def test_stack_reasons_check_forward_probes_nothing() -> None:
    """The check forward on two samples (compared within a tolerance) at two threads decides its
    products by the rule alone: its layouts (two samples a member) no run meets again, and a probe of
    each cost milliseconds for nothing."""
    from dse.train.stacked import stack_reason

    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    before = batched_sums.decided()
    with torch_threads(2):
        assert stack_reason(model, torch.randn(2, 64)) is None
    assert _new_sites(before) == []


def test_a_fold_probes_a_middle_chunk_at_each_other_alignment(no_decisions: None) -> None:
    """Chunks of 20 fp32 reduction indices start their operands 80 bytes apart: the chunks at 20, 40
    and 60 start at 16, 32 and 48 bytes modulo the 64 a probe's layout keeps, which a BLAS may take
    another path for; each is probed, besides the first and the last. Chunks of 16 (64 bytes) all
    start as the first: none is probed."""
    from dse.formats import get
    from dse.formats.base import MemberGenerators
    from dse.train.policy import TensorQuant
    from dse.train.stacked import _accumulator

    source = torch.Generator().manual_seed(9)
    a, b = torch.randn(3, 16, 100, generator=source), torch.randn(3, 100, 24, generator=source)
    for chunk, starts in [(20, [0, 20, 40, 60, 80]), (16, [0, 96])]:
        stacked_acc = _accumulator(TensorQuant(get("fp16")), chunk,
                                   MemberGenerators([torch.Generator() for _ in range(3)]))
        assert stacked_acc is not None
        before = batched_sums.decided()
        with torch_threads(2):
            folded = accumulation.matmul_forward(a, b, stacked_acc)
            assert sorted(site[2] for site in _new_sites(before) if site[0] == "fold") == starts
            own = accumulation.Accumulator(TensorQuant(get("fp16")), chunk)
            alone = [accumulation.matmul_forward(a[g], b[g], own) for g in range(3)]
        assert _same_bits(folded, torch.stack(alone))


def test_a_fold_decides_before_computing_the_groups_chunk() -> None:
    """A single-chunk fold that the group must run member by member computes no batched product
    first (it computed the group's and discarded it before)."""
    from dse.formats import get
    from dse.formats.base import MemberGenerators
    from dse.train.policy import TensorQuant
    from dse.train.stacked import _accumulator

    source = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 8, 40, generator=source), torch.randn(3, 40, 1, generator=source)  # one column
    quant = TensorQuant(get("fp16"))
    stacked_acc = _accumulator(quant, 64, MemberGenerators([torch.Generator() for _ in range(3)]))
    assert stacked_acc is not None
    with torch_threads(1), AtenCalls() as seen:
        folded = accumulation.matmul_forward(a, b, stacked_acc)
    assert [n for n in seen.names if "mm" in n] == ["aten::mm"] * 3
    alone = [accumulation.matmul_forward(a[g], b[g], accumulation.Accumulator(quant, 64)) for g in range(3)]
    assert _same_bits(folded, torch.stack(alone))


# --- grouped runs against alone at two threads ------------------------------------------------------

TWO_THREADS: list[tuple[str, dict[str, Any]]] = [
    # a functional x @ W whose logits reduce 1024 features: at 2 threads the batched matmul differed
    ("x@W-fp16", {"model": f"{MODELS}:wide_head", "format": "fp16"}),
    # the accumulation emulation's one chunk of 1024 products, rounded to posit32 (which keeps an fp32
    # sum's last bits near 1): the group's chunk differed
    ("x@W-posit32-acc", {"model": f"{MODELS}:wide_head", "format": "bf16", "accumulation": "posit32",
                         "accumulation_chunk": 1024}),
    ("x@W-fp8-fp16-acc", {"model": f"{MODELS}:wide_head", "format": "fp8_e4m3", "accumulation": "fp16"}),
    ("mlp-int8", {"model": "mlp", "format": "int8"}),
    ("mlp-fp8-fp16-acc", {"model": "mlp", "format": "fp8_e4m3", "accumulation": "fp16"}),
    ("cnn-int8", {"model": "cnn", "format": "int8"}),  # convolutions member by member
]


@pytest.fixture(scope="module")
def digits_256(subset: Callable[[str, int, int], Any]) -> Any:
    return subset("digits", 256, 100)


@pytest.mark.parametrize("fields", [fields for _, fields in TWO_THREADS], ids=[n for n, _ in TWO_THREADS])
def test_a_group_at_two_threads_equals_each_members_run_alone(
        fields: dict[str, Any], digits_256: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    """The first two differed before the probe: the batched product's long reduction summed in another
    order than the member's mm (member 0's final loss 2.2230955362319946 grouped against
    2.22309547662735 alone in fp16, 2.2230963706970215 against 2.223096251487732 accumulating)."""
    base = TrainConfig(dataset="digits", epochs=1, batch_size=64, threads=2, **fields)
    results = stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1, lr=0.1)], digits_256)
    assert len({r["final_loss"] for r in results}) == 2


# --- CUDA (benchmarks/gpu_check.py runs these where a device is lent) -----------------------------


@CUDA
@pytest.mark.parametrize(("rows", "reduction", "columns"), [(64, 64, 128), (64, 1024, 10), (1, 512, 64),
                                                            (1024, 64, 1), (4, 8, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_on_cuda_a_groups_gemm_is_each_members_own(rows: int, reduction: int, columns: int,
                                                   bias: bool) -> None:
    """Whatever cuBLAS picks for the batched call, the group keeps each member's own product."""
    for a_t, b_t in [(False, False), (False, True), (True, False)]:
        ops = _operands(3, rows, reduction, columns, a_t, b_t, bias, seed=6, device="cuda")
        assert _same_bits(member_gemm(*ops), _each_own(ops))


@CUDA
@pytest.mark.parametrize("fields", [fields for _, fields in TWO_THREADS], ids=[n for n, _ in TWO_THREADS])
def test_on_cuda_a_group_equals_each_members_run_alone(
        fields: dict[str, Any], digits_256: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    base = TrainConfig(dataset="digits", epochs=1, batch_size=64, device="cuda", **fields)
    stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1, lr=0.1)], digits_256)



@pytest.mark.parametrize("thread_count", [1, 2])
def test_a_stacked_fp32_matmul_and_its_gradients_are_each_members_own(thread_count: int) -> None:
    """Attention's q k^T in fp32 (the warm-up, an fp32 proxy): alone a batched matmul too; the group's
    product and autograd's two gradient products equal each member's, batched or member by member."""
    from dse.train.stacked import StackedMatmul

    source = torch.Generator().manual_seed(7)
    a, b = torch.randn(2 * 3, 2, 40, 24, generator=source), torch.randn(2 * 3, 2, 24, 40, generator=source)
    dy = torch.randn(2 * 3, 2, 40, 40, generator=source)
    with torch_threads(thread_count):
        ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
        together = StackedMatmul(2, None)(ga, gb)
        together.backward(dy)
        for g in range(2):
            rows = slice(3 * g, 3 * g + 3)
            ma, mb = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
            y = ma @ mb
            y.backward(dy[rows])
            assert _same_bits(together[rows].detach(), y.detach())
            assert ga.grad is not None and gb.grad is not None and ma.grad is not None and mb.grad is not None
            assert _same_bits(ga.grad[rows], ma.grad) and _same_bits(gb.grad[rows], mb.grad)


def test_a_stacked_fp32_matmul_that_sums_as_each_members_runs_one_batched_matmul() -> None:
    """Where the probe finds the group's matmul (and its gradient's products) sums as each member's,
    the stacked fp32 matmul runs the one batched matmul `a @ b` runs, no product more."""
    from dse.train.stacked import StackedMatmul

    a, b = torch.randn(2 * 3, 2, 40, 24), torch.randn(2 * 3, 2, 24, 40)
    with torch_threads(1):
        split = (a.view(2, 3, 2, 40, 24), b.view(2, 3, 2, 24, 40))
        alike = sums_as_members("matmul with its gradient", functools.partial(_matmul_with_grads, 1),
                                functools.partial(_matmul_with_grads, 0), split, True)
        with AtenCalls() as stacked:
            StackedMatmul(2, None)(a, b)
        with AtenCalls() as plain:
            _ = a @ b
    products = [n for n in stacked.names if "mm" in n]
    assert products == ([n for n in plain.names if "mm" in n] if alike else ["aten::bmm"] * 2)
