"""Grouped training of the integer and accumulating methods: NITI (per-member exponents, update
widths and rounding draws) and the accumulation emulation (narrow accumulators) stack, and each
member computes what `train` computes for it alone, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dse.data import load_dataset
from dse.formats.base import MemberGenerators
from dse.train import TrainConfig, grouped
from dse.train.grouped import group_reason
from dse.train.niti import act_calc, float_to_int, grad_calc, integer_ce_error, stacked
from dse.train.niti.exponents import _mantissa_of
from dse.train.niti.stacked import (
    act_calc_members,
    float_to_int_members,
    grad_calc_members,
    mantissa_of_members,
)

BASE = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")




# --- accumulation emulation --------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"format": "fp8_e4m3", "accumulation": "fp16"},
    {"format": "int8", "accumulation": "bf16", "accumulation_chunk": 1},
    {"format": "fp8_e5m2", "rounding": "stochastic", "accumulation": "fp8_e5m2", "accumulation_chunk": 4,
     "layers": [{"match": "1", "format": "int8"}]},
], ids=["fp16-chunk16", "bf16-chunk1", "e5m2-chunk4-per-layer"])
def test_accumulating_members_equal_alone_runs_bit_for_bit(
        fields: dict[str, Any], digits: Any, stacked_same_as_alone: Callable[..., Any],
) -> None:
    """Each chunk is a batched matmul over the same reduction indices as the member's GEMM alone, and
    the accumulator rounds elementwise, so the chunks fold in the same order: no sum is reordered."""
    base = BASE.replace(**fields)
    configs = [base.replace(seed=0), base.replace(seed=1, lr=0.1), base.replace(seed=2)]
    results = stacked_same_as_alone(configs, digits)
    assert len({r["final_loss"] for r in results}) == 3


TORCH_GRAIN_ELEMENTS = 32768
"""at::internal::GRAIN_SIZE: torch splits an elementwise operation over this many elements among its
threads."""


def _operation_sizes(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """run()'s result and (name, elements of its output) of every torch operation it ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[str, int]] = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            name = func._schema.name
            views = ("aten::slice", "aten::view", "aten::unsqueeze")
            if isinstance(out, torch.Tensor) and not name.startswith(views):
                seen.append((name, out.numel()))
            return out

    with Sizes():
        result = run()
    return result, seen


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "features", "members"), [
    (40, (64, 256), 3),  # a member's chunk 16384 elements, the group's 49152: runs of one member
    (40, (64, 200), 5),  # 12800 and 64000: runs of two members, and one of one
    (40, (16, 16), 4),   # 256 and 1024: the whole group at once
], ids=["runs-of-1", "runs-of-2-and-1", "one-run"])
def test_a_grouped_fold_keeps_each_operation_under_torchs_parallel_grain_and_equals_alone(
        rows: int, features: tuple[int, int], members: int, threads: int) -> None:
    """A fold is hundreds of small operations per GEMM (a chunk's matmul, the accumulator's rounding, the
    add); a group's chunk over torch's grain (32768 elements) where a member's is under it opened a
    parallel region in each of them (a transformer group of 2 at 2 threads took 4x its members alone).
    The stacked fold runs over consecutive members whose chunk stays under the grain, and where the whole
    group's does, once for the group; every member's result is its fold alone, bit for bit."""
    from dse.formats import get
    from dse.train import accumulation
    from dse.train.policy import TensorQuant
    from dse.train.stacked import _accumulator

    source = torch.Generator().manual_seed(0)
    a = torch.randn(members, rows, features[0], generator=source)
    dy = torch.randn(members, rows, features[1], generator=source) * 100
    quant = TensorQuant(get("fp8_e5m2"))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    stacked_acc = _accumulator(quant, 4, generators)
    assert stacked_acc is not None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        folded, sizes = _operation_sizes(lambda: accumulation.matmul_backward_b(a, dy, stacked_acc))
        alone = [accumulation.matmul_backward_b(a[g].clone(), dy[g].clone(),  # alone: fresh tensors
                                                accumulation.Accumulator(quant, 4)) for g in range(members)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(folded, torch.stack(alone))
    one_member = features[0] * features[1]
    fold_sizes = [size for name, size in sizes if name not in ("aten::cat", "aten::stack")]
    if one_member * members < TORCH_GRAIN_ELEMENTS:
        assert max(fold_sizes) == one_member * members  # the group's chunk at once: dispatch shared
    else:
        assert max(fold_sizes) < TORCH_GRAIN_ELEMENTS
        assert max(fold_sizes) == one_member * ((TORCH_GRAIN_ELEMENTS - 1) // one_member)


@settings(max_examples=15, deadline=None)
@given(members=st.integers(1, 5), rows=st.integers(1, 24),
       features=st.tuples(st.integers(1, 32), st.integers(1, 32)), chunk=st.sampled_from([1, 3, 16]),
       accumulator=st.sampled_from(["fp16", "bf16", "fp8_e5m2"]), grain=st.sampled_from([2, 64, 500, 2**62]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
# a group of one member: its fold took the plain batched path, unchecked by the small-product rule
# (a 6 x 3 x 12 chunk through torch's bmm loop: one forward element off in its last bit before)
@example(members=1, rows=6, features=(15, 12), chunk=3, accumulator="fp16", grain=2, threads=1, seed=15)
# the reference was each member's slice, not its tensor alone: member 1's sliced 24 and 16 bytes past
# 64 (blocks 5336 and 464 bytes apart), where MKL on an AMD EPYC summed the matmul's backward-a chunks
# (23 x 16 x 2, 23 x 13 x 2) otherwise than on fresh tensors, which the group matches
@example(members=3, rows=23, features=(2, 29), chunk=16, accumulator="fp16", grain=2**62, threads=1,
         seed=5237)
def test_a_stacked_linear_and_matmul_fold_equal_each_members_gemms_alone_whatever_the_runs(
        members: int, rows: int, features: tuple[int, int], chunk: int, accumulator: str, grain: int,
        threads: int, seed: int) -> None:
    """Every GEMM a stacked layer folds (a Linear's forward, backward-data and backward-weight, and a
    4-d matmul's three) equals its member's GEMMs alone (the Linear's alone path: F.linear and its own
    chunks, dse/train/accumulation.py), bit for bit, however the members are cut into runs: the grain
    is drawn (2**62: the whole group at once) so that small shapes take every path, runs of one, of
    several with a shorter last one, and one run, on one thread and two. Every shape: where a
    chunk's GEMM has under 400 multiply-adds a member, torch's CPU bmm sums with a loop of its own
    (aten's baddbmm_cpu_kernel), whose last bit can differ from the mm a member's Linear alone runs,
    and the group folds member by member there (`test_a_fold_at_torchs_small_bmm_boundary...`)."""
    together, each = _folded_and_alone(members, rows, features, chunk, accumulator, grain, threads, seed)
    for gemm, result in enumerate(together):
        assert torch.equal(result, torch.stack([gemms[gemm] for gemms in each])), gemm


@pytest.mark.parametrize(("rows", "features", "chunk"), [
    (9, (4, 8), 16),  # backward-weight chunks of 16 rows: 4 x 8 x 9 = 288 multiply-adds
    (9, (13, 5), 3),    # backward-weight: 13 x 5 x 3 = 195
    (2, (5, 17), 3),    # forward: 2 x 17 x 3 = 102
    (1, (32, 5), 3),    # backward-data over a single row
    (3, (64, 17), 3),   # backward-data: chunks of 3 x 3 x 64 = 576, the last chunk 3 x 2 x 64 = 384
    (4, (10, 10), 10),  # 400 in each GEMM of a chunk: one batched matmul
], ids=["weight-288", "weight-195", "forward-102", "one-row", "short-last-chunk", "at-400"])
def test_a_fold_at_torchs_small_bmm_boundary_equals_each_members_gemms_alone(
        rows: int, features: tuple[int, int], chunk: int) -> None:
    """Shapes where a fold's whole-group batched chunk went through torch's CPU bmm loop for small
    products (under 400 multiply-adds a member, aten's `bmm_out_or_baddbmm_`) and differed from the
    member's own GEMM in its last bit (each measured before the fold ran them member by member, fp16
    accumulator, 5 members, one thread), and one at the boundary."""
    fin, fout = features
    seed = rows * 1000 + fin * 10 + fout
    together, each = _folded_and_alone(5, rows, features, chunk, "fp16", 2**62, 1, seed)
    for gemm, result in enumerate(together):
        assert torch.equal(result, torch.stack([gemms[gemm] for gemms in each])), gemm


@pytest.mark.parametrize(("rows", "features", "bias"), [
    (5, (1, 100), True),    # forward: a reduction of one, with a bias (500 multiply-adds)
    (8, (64, 1), False),    # forward: one column; backward-weight: one row (512)
    (13, (33, 1), True),
    (19, (21, 1), False),   # 399 multiply-adds forward
    (7, (3, 19), True),     # 399 forward, backward-data 7 x 19 x 3 = 399
    (4, (10, 10), True),    # 400 in each GEMM: batched
], ids=["reduction-1", "column-1", "column-1-bias", "399-column-1", "399", "at-400"])
def test_a_stacked_linear_where_torchs_batched_gemm_sums_otherwise_equals_each_members_linear_alone(
        rows: int, features: tuple[int, int], bias: bool) -> None:
    """A stacked Linear's three GEMMs equal each member's Linear alone (F.linear, dy @ W, dy^T x) where
    a CPU bmm / baddbmm would not sum as the member's mm (`bmm_sums_as_mm`): each shape but the last
    differed in its last bit as one batched GEMM (measured, 3 members, one thread)."""
    from dse.train.batched_sums import bmm_sums_as_mm
    from dse.train.layers import LinearOp
    from dse.train.stacked import StackedLinearOp

    (fin, fout), members = features, 3
    source = torch.Generator().manual_seed(rows * 7 + fin * 3 + fout)
    x = torch.randn(members, rows, fin, generator=source)
    w = torch.randn(members, fout, fin, generator=source)
    b = torch.randn(members, fout, generator=source) if bias else None
    dy = torch.randn(members, rows, fout, generator=source)
    op, alone = StackedLinearOp(), LinearOp()
    y, (dx, dw) = op.forward(x, w, b), op.backward(dy, x, w, True, True)
    for g in range(members):  # alone: fresh tensors (a member's slice here may start off their alignment)
        x_g, w_g, dy_g = x[g].clone(), w[g].clone(), dy[g].clone()
        dx_g, dw_g = alone.backward(dy_g, x_g, w_g, True, True)
        assert torch.equal(y[g], alone.forward(x_g, w_g, None if b is None else b[g].clone()))
        assert dx is not None and dw is not None and torch.equal(dx[g], dx_g) and torch.equal(dw[g], dw_g)
    assert bmm_sums_as_mm(rows, fin, fout) == (features == (10, 10))


def _folded_and_alone(members: int, rows: int, features: tuple[int, int], chunk: int, accumulator: str,
                      grain: int, threads: int, seed: int
                      ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The six folded GEMMs of a stacked Linear and a 4-d matmul for `members` at once, and each
    member's alone (the Linear's alone path: F.linear and its own chunks)."""
    import functools

    from dse.formats import get
    from dse.train import accumulation, stacked
    from dse.train.accumulation import Accumulator
    from dse.train.policy import TensorQuant
    from dse.train.stacked import StackedLinearOp, _accumulator

    source = torch.Generator().manual_seed(seed)
    (fin, fout), op = features, StackedLinearOp()
    x = torch.randn(members, rows, fin, generator=source)
    w = torch.randn(members, fout, fin, generator=source)
    dy = torch.randn(members, rows, fout, generator=source) * 100
    a = torch.randn(members, 2, rows, fin, generator=source)
    b = torch.randn(members, 2, fin, fout, generator=source)
    e = torch.randn(members, 2, rows, fout, generator=source)
    quant = TensorQuant(get(accumulator))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    group = _accumulator(quant, chunk, generators)
    assert group is not None
    alone = [Accumulator(functools.partial(quant, generator=generators.generators[g]), chunk)
             for g in range(members)]
    previous, grain_before = torch.get_num_threads(), stacked.PARALLEL_GRAIN
    torch.set_num_threads(threads)
    stacked.PARALLEL_GRAIN = grain
    try:
        dx, dw = op.backward_accumulated(dy, x, w, True, True, group)
        together = [op.forward_accumulated(x, w, None, group), dx, dw,
                    accumulation.matmul_forward(a, b, group), accumulation.matmul_backward_a(e, b, group),
                    accumulation.matmul_backward_b(a, e, group)]
        each = []
        for g in range(members):  # alone: fresh tensors (a member's slice here may start off their alignment)
            x_g, w_g, dy_g, a_g, b_g, e_g = (t[g].clone() for t in (x, w, dy, a, b, e))
            each.append([accumulation.linear_forward(x_g, w_g, alone[g]),
                         accumulation.linear_backward_data(dy_g, w_g, alone[g]),
                         accumulation.linear_backward_weight(dy_g, x_g, alone[g]),
                         accumulation.matmul_forward(a_g, b_g, alone[g]),
                         accumulation.matmul_backward_a(e_g, b_g, alone[g]),
                         accumulation.matmul_backward_b(a_g, e_g, alone[g])])
    finally:
        stacked.PARALLEL_GRAIN = grain_before
        torch.set_num_threads(previous)
    return together, each


def test_an_accumulating_transformer_group_equals_alone_runs_at_two_threads(
        subset: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    """The transformer's FFN weight gradients fold chunks of 16384 elements a member: a group folds
    them member by member, the attention's small ones for the group at once, each as alone."""
    base = TrainConfig(model="transformer", dataset="sort-easy", epochs=1, batch_size=32, threads=2,
                       format="lns8", optimizer="lns-madam", master_weights=False, accumulation="fp8_e5m2",
                       accumulation_chunk=16)
    results = stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1, lr=2.0**-6)],
                                    subset("sort-easy", 64, 32))
    assert len({r["final_loss"] for r in results}) == 2


def test_an_accumulating_member_that_diverges_does_not_disturb_the_others(
        digits: Any, stacked_same_as_alone: Callable[..., Any],
) -> None:
    base = BASE.replace(format="fp8_e4m3", accumulation="fp16", epochs=2)  # lr 100 overflows fp16
    members = [base.replace(seed=0), base.replace(seed=1, lr=100.0), base.replace(seed=2)]
    results = stacked_same_as_alone(members, digits)
    assert [r["diverged"] for r in results] == [False, True, False]
    assert math.isnan(results[1]["final_loss"]) and results[0]["test_accuracy"] > 0.5


# --- NITI ----------------------------------------------------------------------------------------

NITI = BASE.replace(format="int8", optimizer="niti")


@pytest.mark.parametrize("fields, members, chunk", [
    ({"epochs": 2}, [{"seed": 0}, {"seed": 1, "niti_mu": 3}, {"seed": 2, "niti_mu": 6}], None),
    ({"master_weights": "int16", "niti_mu": 6}, [{"seed": 0}, {"seed": 1, "niti_mu": 4}, {"seed": 2}], 2**14),
    ({"format": "int(6)", "niti_mu": 3}, [{"seed": 3}, {"seed": 4}], 1),
], ids=["int8-mu-schedule", "int16-accumulator-in-chunks", "int6-member-by-member"])
def test_niti_mlp_members_equal_alone_runs_bit_for_bit(fields: dict[str, Any], members: list[dict[str, Any]],
                                                       chunk: int | None, digits: Any,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       stacked_same_as_alone: Callable[..., Any]) -> None:
    """Per-member exponents, shifts, update widths (niti_mu and its schedule) and cross-entropy draws:
    integer arithmetic, so every member is exactly its run alone, whether the update steps all
    members at once or in chunks of members (`chunk` entries: two of the three 64 x 128 weights at a
    time, one member at a time)."""
    if chunk is not None:
        monkeypatch.setattr(stacked, "STEP_CHUNK_ELEMENTS", chunk)
    base = NITI.replace(**fields)
    results = stacked_same_as_alone([base.replace(**member) for member in members], digits)
    assert len({r["final_loss"] for r in results}) == len(members)


@pytest.mark.parametrize("model, dataset, batch", [("cnn", "mnist1d", 100), ("cnn", "digits", 64),
                                                   ("resnet", "digits", 64)],
                         ids=["conv1d", "conv2d-maxpool", "resnet-batchnorm"])
def test_niti_cnn_members_equal_alone_runs_bit_for_bit(
        model: str, dataset: str, batch: int, stacked_same_as_alone: Callable[..., Any],
) -> None:
    """Each member's convolutions on its slice of the folded batch; the ResNet's BatchNorm (frozen
    under NITI) with each member's own batch statistics, its residual sums re-quantized per member."""
    base = NITI.replace(model=model, dataset=dataset, batch_size=batch)
    stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1, niti_mu=4)], load_dataset(dataset))


@pytest.mark.parametrize("fields, members", [
    ({}, [{"seed": 0}, {"seed": 1, "niti_mu": 3}, {"seed": 2, "niti_mu": 31}]),
    ({"master_weights": "int16", "epochs": 2}, [{"seed": 3}, {"seed": 4, "niti_mu": 4}]),
], ids=["int8-mu-and-a-wild-member", "int16-accumulator-mu-schedule"])
def test_niti_transformer_members_equal_alone_runs_bit_for_bit(
        fields: dict[str, Any], members: list[dict[str, Any]], subset: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch, stacked_same_as_alone: Callable[..., Any],
) -> None:
    """The sort transformer stacked under NITI: each member's token rows from its own embedding table
    (its gradient a scatter-add into that table), attention's two integer matmuls with a RoundShift and
    exponent per member, Linear over each member's positions, LayerNorm and the position table per
    member. Every member is its run alone, the one whose update is its whole accumulator (niti_mu 31,
    a loss far from the others') included; and the group trains stacked, never one by one."""

    def one_by_one(*_: object) -> None:
        raise AssertionError("the NITI transformer group fell back to training one by one")

    monkeypatch.setattr(grouped, "train", one_by_one)  # train_group's fallback (the alone runs import theirs)
    base = NITI.replace(model="transformer", dataset="sort-easy", **fields)
    data = subset("sort-easy", 256, 200)
    results = stacked_same_as_alone([base.replace(**member) for member in members], data)
    assert len({r["final_loss"] for r in results}) == len(members)


NITI_MODELS = """
import torch
from torch import nn

from dse.models.layers import Matmul


class PaddedAttention(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 16, padding_idx=0)
        self.query = nn.Linear(16, 16)
        self.scores = Matmul()
        self.context = Matmul()
        self.head = nn.Linear(16, vocab)

    def forward(self, tokens):
        h = self.query(self.embedding(tokens))  # the embedding's one NITI consumer sends its exponents back
        batch, seq, _ = h.shape
        q = h.view(batch, seq, 2, 8).transpose(1, 2)
        k = h[..., :8].unsqueeze(1).transpose(-2, -1)  # one key for both heads: a broadcast matmul
        weights = torch.softmax(self.scores(q, k), -1)
        return self.head(self.context(weights, torch.relu(q)).transpose(1, 2).reshape(batch, seq, 16))


def padded_attention(shape, classes):
    return PaddedAttention(classes)


def twice(shape, classes):  # one Linear at two places
    shared = nn.Linear(32, 32)
    return nn.Sequential(nn.Linear(shape[0], 32), nn.ReLU(), shared, nn.ReLU(), shared,
                         nn.Linear(32, classes))


class Volume(nn.Module):
    def forward(self, x):
        return x.reshape(len(x), 1, 4, 4, 4)


def conv3d(shape, classes):
    return nn.Sequential(Volume(), nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, classes))


class Attention(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        tokens = x.reshape(len(x), 8, 8)
        return self.head(self.attn(tokens, tokens, tokens)[0].reshape(len(x), 64))


def attention(shape, classes):
    return Attention(classes)


class Scores(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.key = nn.Linear(8, 8)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        tokens = x.reshape(len(x), 8, 8)
        mixed = torch.softmax(self.key(tokens) @ tokens.transpose(1, 2), -1) @ tokens
        return self.head(mixed.reshape(len(x), 64))


def scores(shape, classes):
    return Scores(classes)
"""


@pytest.fixture(scope="module")
def niti_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("niti") / "nets.py"
    path.write_text(NITI_MODELS)
    return path


@pytest.mark.parametrize("factory, dataset", [("padded_attention", "sort-easy"), ("twice", "digits"),
                                              ("conv3d", "digits")])
def test_niti_users_models_stack_and_equal_alone_runs(factory: str, dataset: str, niti_models: Path,
                                                      subset: Callable[..., Any],
                                                      stacked_same_as_alone: Callable[..., Any]) -> None:
    """An embedding with a padding row whose error comes back with its exponents, a matmul that
    broadcasts one key over two heads, a Linear applied at two places (one NITI weight, its two
    gradients summed), a 3-D convolution: each member is its run alone."""
    base = NITI.replace(model=f"{niti_models}:{factory}", dataset=dataset)
    stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1, niti_mu=4)], subset(dataset, 256, 200))


@pytest.mark.parametrize("factory", ["attention", "scores"])
def test_niti_models_with_gemms_called_as_functions_train_one_by_one_and_say_why(
        factory: str, niti_models: Path, subset: Callable[..., Any],
        same_as_alone: Callable[..., Any]) -> None:
    """NITI converts GEMM modules only: nn.MultiheadAttention's GEMMs and a forward's `@` stay float
    under NITI, and stack under the other methods only."""
    base = NITI.replace(model=f"{niti_models}:{factory}")
    assert group_reason(base.replace(optimizer="sgd")) is None
    reason = group_reason(base)
    assert reason is not None and "function calls" in reason and "NITI" in reason
    same_as_alone([base.replace(seed=0), base.replace(seed=1)], subset("digits", 128, 100))


@settings(max_examples=30, deadline=None)
@given(exps=st.lists(st.integers(-12, 6), min_size=1, max_size=4), rows=st.integers(1, 5),
       classes=st.integers(2, 7), division=st.sampled_from(["reference", "integer"]),
       seed=st.integers(0, 999))
def test_integer_ce_error_of_stacked_logits_is_each_members_alone(exps: list[int], rows: int, classes: int,
                                                                  division: str, seed: int) -> None:
    """Members in the base-2 branch run as one batch of rows; members below -bitwidth (the Taylor
    branch) or the integer division run one by one: either way each member gets its error alone."""
    source = torch.Generator().manual_seed(seed)
    logits = torch.randint(-127, 128, (len(exps), rows, classes), generator=source)
    targets = torch.randint(0, classes, (len(exps), rows), generator=source)
    generators = MemberGenerators([torch.Generator().manual_seed(seed + g) for g in range(len(exps))])
    stacked = integer_ce_error(logits, tuple(exps), targets, generators, division=division)
    for g, exp in enumerate(exps):
        alone = integer_ce_error(logits[g], exp, targets[g], torch.Generator().manual_seed(seed + g),
                                 division=division)
        assert torch.equal(stacked[g], alone)


@pytest.mark.parametrize("exp", [-7, -5, -3])
def test_integer_ce_numerators_of_stacked_logits_are_each_members_alone_to_the_last_bit(exp: int) -> None:
    """2^s is a float32 numerator, and torch's CPU pow gives some s (about 1 in 60 here) another
    last bit in its vector kernel than in the scalar tail of a tensor: alone, each member's last
    rows * classes mod 32 elements take the tail; stacked, only the group's would. 64 members of
    7 rows x 10 classes put ~400 elements in members' tails; before the numerators were taken member
    by member, some of them differed."""
    from dse.train.niti.ti_loss import _reference_ce_numerators

    members = 64
    logits = torch.randint(-127, 128, (members * 7, 10), generator=torch.Generator().manual_seed(0))
    stacked = _reference_ce_numerators(logits, (exp,) * members, 8, 12).view(members, 7, 10)
    for g in range(members):
        alone = _reference_ce_numerators(logits[7 * g:7 * (g + 1)], exp, 8, 12)
        assert torch.equal(stacked[g], alone), g


@settings(max_examples=40, deadline=None)
@given(members=st.integers(1, 4), magnitudes=st.lists(st.integers(0, 40), min_size=4, max_size=4),
       mus=st.lists(st.integers(1, 8), min_size=4, max_size=4), seed=st.integers(0, 999))
def test_member_decisions_are_each_members_own(members: int, magnitudes: list[int], mus: list[int],
                                               seed: int) -> None:
    """TiFloatToInt8, act_calc (RoundShift by RangeEstimate) and grad_calc per member equal the
    per-tensor primitives on each member alone, members of very different ranges side by side."""
    source = torch.Generator().manual_seed(seed)
    scale = torch.tensor([2.0 ** (m - 20) for m in magnitudes[:members]]).view(-1, 1, 1)
    x = torch.randn(members, 3, 5, generator=source) * scale
    acc = torch.round(torch.randn(members, 3, 5, generator=source) * scale * 2.0**20)
    acc[0] = 0.0 if magnitudes[0] == 0 else acc[0]
    m_x, exps = float_to_int_members(x, 7)
    m_acc, shifts = act_calc_members(acc, 7)
    update = grad_calc_members(acc.to(torch.int64), mus[:members], 7)
    for g in range(members):
        alone_m, alone_e = float_to_int(x[g])
        assert exps[g] == alone_e and torch.equal(m_x[g].to(torch.int64), alone_m)
        alone_acc, alone_shift = act_calc(acc[g])
        assert shifts[g] == alone_shift and torch.equal(m_acc[g], alone_acc)
        assert torch.equal(update[g], grad_calc(acc[g].to(torch.int64), mus[g]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fields", [
    {"format": "int8", "optimizer": "niti"},
    {"format": "int8", "optimizer": "niti", "model": "cnn", "dataset": "mnist1d", "batch_size": 100},
    {"format": "int8", "optimizer": "niti", "model": "transformer", "dataset": "sort-easy"},
    {"format": "fp8_e4m3", "accumulation": "fp16"},
], ids=["niti-mlp", "niti-cnn", "niti-transformer", "accumulation"])
def test_grouped_members_equal_alone_runs_on_cuda(
        fields: dict[str, Any], stacked_same_as_alone: Callable[..., Any],
) -> None:
    """NITI's integer sums are exact on any kernel; an accumulating chunk is a float GEMM, which a
    batched cuBLAS call may sum in another order than a single one: this says whether it does."""
    base = BASE.replace(device="cuda", **fields)
    stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1)], load_dataset(base.dataset))


def test_each_member_keeps_its_tagged_exponent_only_where_its_values_sit_on_that_grid() -> None:
    """The exponent a NITI layer reads from its input, per member as `_mantissa_of` reads it alone:
    on the grid (kept), off the grid or outside float32's exact scaling (TiFloatToInt8 afresh)."""
    source = torch.Generator().manual_seed(0)
    mantissas = torch.randint(-10, 11, (4, 3, 5), generator=source).float()  # TiFloatToInt8 would scale up
    mantissas[:, 0, 1] = 10.0
    exps = (-9, -3, 120, -4)
    values = torch.stack([m * 2.0**e for m, e in zip(mantissas, exps, strict=True)])
    values[1, 0, 0] += 2.0**-6  # member 1 off its grid
    stacked, stacked_exps = mantissa_of_members(values, exps, 7)
    for g, exp in enumerate(exps):
        alone, alone_exp = _mantissa_of(values[g], exp, 7)
        assert stacked_exps[g] == alone_exp and torch.equal(stacked[g], alone)
    assert [e - s for e, s in zip(exps, stacked_exps, strict=True)] == [0, 3, 3, 0]  # kept, afresh x2, kept


@pytest.mark.parametrize("optimizer", ["niti", "sgd"])
def test_a_users_frozen_weights_stay_frozen_grouped_as_alone(
        optimizer: str, subset: Callable[..., Any], stacked_same_as_alone: Callable[..., Any]) -> None:
    """A fine-tuning network (tests/support/user_models.py:frozen: a frozen first layer, norm and middle
    weight): each member is its run alone, where NITI, like SGD, leaves the frozen weights as they are."""
    users = Path(__file__).parents[1] / "support" / "user_models.py"
    base = NITI.replace(model=f"{users}:frozen", dataset="digits", optimizer=optimizer, epochs=1)
    stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1)], subset("digits", 256, 200))
