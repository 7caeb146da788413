"""Users' leaf layers that dse cannot stack (a layer of their own with weights that calls a GEMM
function dse does not convert: torch.addmm, torch.einsum), for the grouped alignment tests: a group
runs such a layer member by member (dse.train.stacked.PerMemberLayer). Sized so that member 1's
slice of a folded batch of 50 rows, its weight, or its output's gradient starts off a 16-byte
boundary, where MKL's sgemm on an AMD EPYC sums an (m, k) @ (n, k)^T product of 9 or 10 columns
otherwise than at the boundary (tests/train/test_train_grouped_align_leaf.py)."""

from __future__ import annotations

import collections
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OwnAffine(nn.Module):
    """x W^T + b as torch.addmm, weight (out, in)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, features) / features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight.t())


class OwnAffineIn(nn.Module):
    """x W + b as torch.addmm, weight stored (in, out): its backward-data dy W^T takes the output's
    gradient as the first operand of a product with a transposed second."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, outputs) / features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


class OwnEinsum(nn.Module):
    """x W^T as torch.einsum, weight (out, in)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, features) / features ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bi,oi->bo", x, self.weight)


class LeafBetween(nn.Module):
    """A Linear to `inputs` features, the leaf layer to `outputs`, a Linear head (tanh between)."""

    def __init__(self, width: int, classes: int, leaf: nn.Module, inputs: int, outputs: int) -> None:
        super().__init__()
        self.a, self.leaf, self.head = nn.Linear(width, inputs), leaf, nn.Linear(outputs, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.leaf(torch.tanh(self.a(x)))))


def own_affine(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Member 1's input (50 x 37 floats in) 8 bytes past 16."""
    return LeafBetween(shape[0], classes, OwnAffine(37, 10), 37, 10)


def own_affine9(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Member 1's input and its 9 x 37 weight off 16 bytes."""
    return LeafBetween(shape[0], classes, OwnAffine(37, 9), 37, 9)


def own_einsum(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LeafBetween(shape[0], classes, OwnEinsum(37, 10), 37, 10)


def own_affine_in_wide(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Member 1's output gradient (50 x 37 floats in) 8 bytes past 16, dy W^T of 10 columns."""
    return LeafBetween(shape[0], classes, OwnAffineIn(10, 37), 10, 37)


def norm37(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A BatchNorm1d of 37 features (each member's weight, bias and running statistics 148 bytes
    apart in the group: off alignment for member 1) between two Linears."""
    return nn.Sequential(nn.Linear(shape[0], 37), nn.BatchNorm1d(37), nn.Tanh(), nn.Linear(37, classes))


class BatchInnerScale(nn.Module):
    """A layer with a weight of its own (run member by member in a group) that works on its input
    batch-innermost: (B, C) in, scaled per channel as a contiguous (C, B), returned as a (B, C) view."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return (x.t().contiguous() * self.weight[:, None]).t()


class BatchInnerReduced(nn.Module):
    """`BatchInnerScale`'s batch-innermost output centred by its mean over the channels (a reduction
    over the axis outside the batch in memory), then a head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.scale, self.head = nn.Linear(width, 40), BatchInnerScale(40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.a(x)))
        return self.head(h - h.mean(1, keepdim=True))


def batch_inner_reduced(shape: tuple[int, ...], classes: int) -> nn.Module:
    return BatchInnerReduced(shape[0], classes)


class BatchInnerStatistics(nn.Module):
    """`BatchInnerScale`'s batch-innermost output normalized over the channels (F.normalize), plus its
    variance over them repeated along them, over its standard deviation, then a head: functions whose
    backward sums a sample's terms inside torch (dse.train.member_kernels.INNER_SUM_FUNCTIONS), and
    whose input has other uses after F.normalize's."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.scale, self.head = nn.Linear(width, 40), BatchInnerScale(40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.a(x)))
        spread = h.var(1, keepdim=True).repeat(1, h.shape[1])
        return self.head((F.normalize(h, dim=1) + 0.5 * spread) / h.std(1, keepdim=True).add(0.5))


def batch_inner_statistics(shape: tuple[int, ...], classes: int) -> nn.Module:
    return BatchInnerStatistics(shape[0], classes)


class ReassignedAverage(nn.Module):
    """A layer that keeps a running average of its input by reassigning its buffer (where BatchNorm
    updates its own in place), 37 features: member 1's part lies 148 bytes into the stacked buffer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.register_buffer("average", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.average = 0.9 * self.average + 0.1 * x.detach().mean(0)
        return x * self.weight - self.average


class MaxNormAffine(OwnAffine):
    """`OwnAffine` whose forward first holds each row of its weight to an L2 norm of at most
    `max_norm`, in place under no_grad (a max-norm constraint), as `torch.nn.Embedding`'s max_norm
    does to its rows: the layer writes its own parameter in its forward."""

    def __init__(self, features: int, outputs: int, max_norm: float) -> None:
        super().__init__(features, outputs)
        self.max_norm = max_norm

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.renorm_(2, 0, self.max_norm)
        return super().forward(x)


class ClampedAffine(OwnAffine):
    """`OwnAffine` whose forward clamps its weight and bias through `.data` (a tensor that shares their
    memory but not their version counter) before using them."""

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data.clamp_(-0.25, 0.25)
        self.bias.data.clamp_(-0.05, 0.05)
        return super().forward(x)


def max_norm_affine(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Member 1's 10 x 37 weight 1480 bytes into the stacked one (off 64 bytes); rows of norm about 1
    held to 0.6, so every step clamps."""
    return LeafBetween(shape[0], classes, MaxNormAffine(37, 10, 0.6), 37, 10)


def clamped_affine(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LeafBetween(shape[0], classes, ClampedAffine(37, 10), 37, 10)


class BatchInnerLogSumExp(nn.Module):
    """`BatchInnerReduced` with its batch-innermost output shifted by its logsumexp over the channels
    (log-softmax written out), then a head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.scale, self.head = nn.Linear(width, 40), BatchInnerScale(40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.a(x)))
        return self.head(h - torch.logsumexp(h, 1, keepdim=True))


def batch_inner_logsumexp(shape: tuple[int, ...], classes: int) -> nn.Module:
    return BatchInnerLogSumExp(shape[0], classes)


class KeywordReduced(BatchInnerReduced):
    """`BatchInnerReduced` with its mean spelled with keywords (`torch.mean(input=h, dim=1, ...)`)."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.a(x)))
        return self.head(h - torch.mean(input=h, dim=1, keepdim=True))


def keyword_reduced(shape: tuple[int, ...], classes: int) -> nn.Module:
    return KeywordReduced(shape[0], classes)


class LazyAverage(nn.Module):
    """A layer that keeps a running average of its input in a buffer registered as None and set by its
    first training forward, 37 features (as `ReassignedAverage`)."""

    def __init__(self, channels: int, weighted: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels)) if weighted else None
        self.register_buffer("average", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.detach().mean(0)
            self.average = mean if self.average is None else 0.9 * self.average + 0.1 * mean
        y = x if self.weight is None else x * self.weight
        return y if self.average is None else y - self.average


def lazy_average(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(shape[0], 37), nn.Tanh(), LazyAverage(37), nn.Linear(37, classes))


def lazy_average_unweighted(shape: tuple[int, ...], classes: int) -> nn.Module:
    """`LazyAverage` with no weight: a layer whose only tensor of its own is the buffer set later."""
    return nn.Sequential(nn.Linear(shape[0], 37), nn.Tanh(), LazyAverage(37, weighted=False),
                         nn.Linear(37, classes))


class SharedLeaf(nn.Module):
    """One leaf layer (37 features in and out) called twice in a forward (weight sharing), a head."""

    def __init__(self, width: int, classes: int, leaf: nn.Module) -> None:
        super().__init__()
        self.a, self.leaf, self.head = nn.Linear(width, 37), leaf, nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.leaf(torch.tanh(self.leaf(torch.tanh(self.a(x)))))))


def shared_max_norm_affine(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SharedLeaf(shape[0], classes, MaxNormAffine(37, 37, 0.6))


def shared_clamped_affine(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SharedLeaf(shape[0], classes, ClampedAffine(37, 37))



class MeanGatedAverage(LazyAverage):
    """`LazyAverage` that sets its buffer (from None) at the first training batch whose mean exceeds
    `threshold`: a member's own data decides when, so members of one group may differ."""

    def __init__(self, channels: int, threshold: float) -> None:
        super().__init__(channels)
        self.threshold = threshold

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.average is None and float(x.detach().mean()) <= self.threshold:
            return x * self.weight
        return super().forward(x)


def mean_gated_average(shape: tuple[int, ...], classes: int) -> nn.Module:
    """On short digits: above the check forwards' samples (mean 0.2988), below every batch of seed 3's
    first epoch (0.3000, 0.2956, 0.2998), under seed 1's first batch (0.3026)."""
    return nn.Sequential(MeanGatedAverage(shape[0], 0.3015), nn.Linear(shape[0], classes))


class ChannelFirstCentred(nn.Module):
    """A Linear's output made channel-first, a contiguous (C, B) tensor (in a group (C, G*B): the
    members' samples on its second axis), centred by its mean over C (a reduction over the axis
    outside the samples in memory), into a Linear head as a (B, C) view."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x)).t().contiguous()
        return self.head((h - h.mean(0, keepdim=True)).t())


def channel_first_centred(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ChannelFirstCentred(shape[0], classes)


class WarmedUpScale(nn.Module):
    """A layer with a weight of its own whose output ramps up over its first `warmup` training
    forwards, counted in a Python int it increments in its forward (a step counter)."""

    def __init__(self, channels: int, warmup: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.warmup = warmup
        self.steps = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.steps += 1
        return x * self.weight * min(1.0, self.steps / self.warmup)


class PeakScaled(nn.Module):
    """A layer with a weight of its own that divides by the largest magnitude its training inputs have
    reached so far, kept as a Python float, and appends each batch's to a list (a layer's own
    statistics, updated in its forward)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.peak = 1.0
        self.seen: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.seen.append(float(x.detach().abs().max()))
            self.peak = max(self.peak, self.seen[-1])
        return x * self.weight / self.peak


def warmed_up_scale(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(shape[0], 37), nn.Tanh(), WarmedUpScale(37, 4), nn.Linear(37, classes))


def peak_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(shape[0], 37), PeakScaled(37), nn.Tanh(), nn.Linear(37, classes))


class HistoryScaled(nn.Module):
    """A network (run once for a group: it holds no weights of its own) that scales its hidden layer by
    1 plus the mean of the earlier training batches' hidden means, which it keeps in a Python list
    its forward appends to: the first forward's output does not depend on it."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.means: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        scale = 1.0 + (sum(self.means) / len(self.means) if self.means else 0.0)
        if self.training:
            self.means.append(float(h.detach().mean()))
        return self.head(h * scale)


class CountedSteps(nn.Module):
    """A network (run once for a group) that counts its training forwards in a Python int and halves
    its hidden layer after the first `steps`: the same count in a group as alone."""

    def __init__(self, width: int, classes: int, steps: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.limit, self.steps = steps, 0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.steps += 1
        h = torch.tanh(self.a(x))
        return self.head(h if self.steps <= self.limit else h * 0.5)


def history_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return HistoryScaled(shape[0], classes)


def counted_steps(shape: tuple[int, ...], classes: int) -> nn.Module:
    return CountedSteps(shape[0], classes, 3)


class SequenceFirstRows(nn.Module):
    """A Linear's output as a sequence-first (L, B, E) tensor (nn.MultiheadAttention's layout with
    batch_first=False), folded into (L*B, E) rows for a SiLU (a position-dependent kernel), then back
    into a Linear head: in a group the rows are (L*G*B, E), sequence-major, not member-major."""

    def __init__(self, width: int, classes: int, length: int = 4, features: int = 10) -> None:
        super().__init__()
        self.length, self.features = length, features
        self.a, self.head = nn.Linear(width, length * features), nn.Linear(length * features, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x).view(len(x), self.length, self.features).transpose(0, 1)
        rows = torch.nn.functional.silu(h.reshape(-1, self.features))
        return self.head(rows.view(self.length, len(x), self.features).transpose(0, 1).flatten(1))


def sequence_first_rows(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SequenceFirstRows(shape[0], classes)


def sequence_first_rows12(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A sequence of 12: a multiple of both checks' folded batches (2 x 2 and 2 x 3 samples), where a
    reading of its shape takes the first axis (its length) for the samples'."""
    return SequenceFirstRows(shape[0], classes, length=12, features=4)


class LateSequenceFirstRows(SequenceFirstRows):
    """`SequenceFirstRows` that folds its rows only from its third forward on (a counter of forwards,
    the same in a group as alone), a SiLU over its batch-first tensor before: the checks' forwards
    never fold, a group's training does."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__(width, classes)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        if self.forwards < 3:
            return self.head(torch.nn.functional.silu(self.a(x)))
        return super().forward(x)


def late_sequence_first_rows(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LateSequenceFirstRows(shape[0], classes)


class TiedToLeaf(nn.Module):
    """`OwnAffine` (a layer run member by member) whose parameter another module takes too: `tie`
    "head" (the head Linear's weight is the leaf's, the classic output-embedding tie), "scale" (the
    network's forward multiplies by the leaf's bias as a tensor), or "penalty" (the network adds the
    leaf's weight's mean to its output; "small penalty": times 1e-6, within the forward check's
    tolerance)."""

    def __init__(self, width: int, classes: int, tie: str) -> None:
        super().__init__()
        self.a, self.leaf = nn.Linear(width, 37), OwnAffine(37, classes)
        self.head = nn.Linear(classes, classes)
        self.tie = tie
        if tie == "head":
            self.head = nn.Linear(37, classes)
            self.head.weight = self.leaf.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.tie == "head":
            return self.head(h) + self.leaf(h)
        y = self.leaf(h)
        if self.tie == "scale":
            return self.head(y * self.leaf.bias)
        return self.head(y) + self.leaf.weight.mean() * (1e-6 if self.tie == "small penalty" else 1.0)


def tied_head(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TiedToLeaf(shape[0], classes, "head")


def tied_scale(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TiedToLeaf(shape[0], classes, "scale")


def tied_penalty(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TiedToLeaf(shape[0], classes, "penalty")


def tied_small_penalty(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TiedToLeaf(shape[0], classes, "small penalty")


class LateEma(nn.Module):
    """A network (run once for a group) that scales its hidden layer by 1 plus an EMA of its training
    batches' hidden means, a Python float it updates from its second training forward on."""
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.steps, self.ema = 0, 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.training:
            self.steps += 1
            if self.steps > 1:
                self.ema = 0.9 * self.ema + 0.1 * float(h.detach().mean())
        return self.head(h * (1.0 + self.ema))


class InputEma(nn.Module):
    """A network (run once for a group) that centres its input by an EMA of its training batches' raw
    input means, a Python float."""
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.ema = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * float(x.mean())
        return self.head(torch.tanh(self.a(x - self.ema)))


class DequeScaled(nn.Module):
    """A network (run once for a group) that scales its hidden layer by 1 plus the mean of its last 3
    training batches' hidden means, kept in a collections.deque."""
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.recent: collections.deque[float] = collections.deque(maxlen=3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        scale = 1.0 + (sum(self.recent) / len(self.recent) if self.recent else 0.0)
        if self.training:
            self.recent.append(float(h.detach().mean()))
        return self.head(h * scale)


class NumpyScaled(nn.Module):
    """A network (run once for a group) that scales its hidden features by 1 plus their running means,
    a numpy array it updates in place."""
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.running = np.zeros(37)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        out = self.head(h * torch.from_numpy(1.0 + self.running).to(h.dtype))
        if self.training:
            self.running *= 0.9
            self.running += 0.1 * h.detach().mean(0).double().numpy()
        return out


def late_ema(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LateEma(shape[0], classes)


def input_ema(shape: tuple[int, ...], classes: int) -> nn.Module:
    return InputEma(shape[0], classes)


def deque_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return DequeScaled(shape[0], classes)


def numpy_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return NumpyScaled(shape[0], classes)


class RunningMean:
    """A user's helper object keeping a running mean in an attribute."""

    def __init__(self) -> None:
        self.value = 0.0

    def update(self, x: float) -> None:
        self.value = 0.9 * self.value + 0.1 * x


class TrackerScaled(nn.Module):
    """A network (run once for a group) that scales its hidden layer by 1 plus a running mean of its
    training batches' hidden means, kept by a helper object of its own (`RunningMean`)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.tracker = RunningMean()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        out = self.head(h * (1.0 + self.tracker.value))
        if self.training:
            self.tracker.update(float(h.detach().mean()))
        return out


def tracker_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TrackerScaled(shape[0], classes)


class SequenceFirstFlat(SequenceFirstRows):
    """`SequenceFirstRows` with the sequence-first (L, B, E) tensor flattened behind its samples' axis,
    (L, B*E), for the SiLU: in a group (L, G*B*E), each member's block one stretch of axis 1."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x).view(len(x), self.length, self.features).transpose(0, 1).contiguous()
        flat = torch.nn.functional.silu(h.flatten(1))
        return self.head(flat.view(self.length, len(x), self.features).transpose(0, 1).flatten(1))


def sequence_first_flat6(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SequenceFirstFlat(shape[0], classes, length=6, features=8)


class NormedResidual(nn.Module):
    """A pre-norm residual block: torch's RMSNorm layer (a weight of its own, run member by member in
    a group; F.rms_norm, a C++ composite, uses its input twice) added to its own input, then a head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.norm, self.head = nn.Linear(width, 40), nn.RMSNorm(40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h + self.norm(h))


def normed_residual(shape: tuple[int, ...], classes: int) -> nn.Module:
    return NormedResidual(shape[0], classes)


class EinsumChannelSum(nn.Module):
    """A Linear's output made channel-first by a one-operand einsum, copied contiguous (C, B) (in a
    group (C, G*B): the members' samples on its second axis), summed over its first axis C (a sum
    outside the samples in memory) to scale each sample into a Linear head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        per_sample = torch.einsum("bc->cb", h).contiguous().sum(0)
        return self.head(h * (1.0 + 0.1 * per_sample).unsqueeze(1))


def einsum_channel_sum(shape: tuple[int, ...], classes: int) -> nn.Module:
    return EinsumChannelSum(shape[0], classes)


class ConstantThenBatchEma(nn.Module):
    """A network (run once for a group) whose first training forward sets a running mean to 0.0, the
    same in every member, and whose later ones update it from their batch's hidden mean."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        ema = self.__dict__.get("ema", 0.0)
        if self.training:
            self.ema = 0.0 if "ema" not in self.__dict__ else 0.9 * ema + 0.1 * float(h.detach().mean())
        return self.head(h * (1.0 + ema))


class NestedHistory(nn.Module):
    """A network (run once for a group) that scales its hidden layer by 1 plus the mean of its earlier
    training batches' hidden means, kept in a list inside a dict."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.history: dict[str, list[float]] = {"means": []}

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        means = self.history["means"]
        scale = 1.0 + (sum(means) / len(means) if means else 0.0)
        if self.training:
            means.append(float(h.detach().mean()))
        return self.head(h * scale)


def constant_then_batch_ema(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ConstantThenBatchEma(shape[0], classes)


def nested_history(shape: tuple[int, ...], classes: int) -> nn.Module:
    return NestedHistory(shape[0], classes)


class PeakWindowScaled(nn.Module):
    """A layer with a weight of its own that divides by the largest magnitude of its last 3 training
    batches, kept in a collections.deque of Python floats (a layer's own statistics)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.peaks: collections.deque[float] = collections.deque(maxlen=3)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.peaks.append(float(x.detach().abs().max()))
        return x * self.weight / (max(self.peaks) if self.peaks else 1.0)


def peak_window_scaled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(shape[0], 37), nn.Tanh(), PeakWindowScaled(37), nn.Linear(37, classes))


class ConstantThenBatchTensorEma(nn.Module):
    """`ConstantThenBatchEma` with its running mean kept as a tensor, never read into Python."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        ema = self.__dict__.get("ema", torch.zeros(()))
        if self.training:
            self.ema = torch.zeros(()) if "ema" not in self.__dict__ else 0.9 * ema + 0.1 * h.detach().mean()
        return self.head(h * (1.0 + ema))


def constant_then_batch_tensor_ema(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ConstantThenBatchTensorEma(shape[0], classes)


class ConstantThenBatchTensorList(nn.Module):
    """A network (run once for a group) that scales its hidden layer by 1 plus the mean of a list of
    tensors it appends to in training: a zero at its first forward (the same in every member), then
    its batch's hidden mean."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.means: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        scale = 1.0 + (torch.stack(self.means).mean() if self.means else 0.0)
        if self.training:
            self.means.append(h.detach().mean() if self.means else torch.zeros(()))
        return self.head(h * scale)


def constant_then_batch_tensor_list(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ConstantThenBatchTensorList(shape[0], classes)


class RandomScaled(nn.Module):
    """A network (run once for a group) that scales its hidden layer in training by 1 plus a number
    drawn each forward from a random generator of its own: Python's random.Random, or torch's,
    seeded with `seed` (None: from torch's global generator, so each trial's differs)."""

    def __init__(self, width: int, classes: int, kind: str, seed: int | None) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        seed = int(torch.randint(1 << 30, ())) if seed is None else seed
        self.rng = random.Random(seed) if kind == "python" else torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if not self.training:
            return self.head(h)
        rng = self.rng
        drawn = rng.random() if isinstance(rng, random.Random) else torch.rand((), generator=rng)
        return self.head(h * (1.0 + drawn))


class GeneratorNoise(nn.Module):
    """A network (run once for a group) that adds noise of its batch's shape in training, drawn from a
    torch.Generator of its own seeded alike in every trial: a group's one draw of G x B rows gives
    member 1 other numbers than its own draw of B rows."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.noise = torch.Generator().manual_seed(7)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.training:
            h = h + 0.1 * torch.randn(h.shape, generator=self.noise)
        return self.head(h)


def python_random_seeded_alike(shape: tuple[int, ...], classes: int) -> nn.Module:
    return RandomScaled(shape[0], classes, "python", 3)


def torch_generator_seeded_alike(shape: tuple[int, ...], classes: int) -> nn.Module:
    return RandomScaled(shape[0], classes, "torch", 3)


def python_random_seeded_per_trial(shape: tuple[int, ...], classes: int) -> nn.Module:
    return RandomScaled(shape[0], classes, "python", None)


def torch_generator_seeded_per_trial(shape: tuple[int, ...], classes: int) -> nn.Module:
    return RandomScaled(shape[0], classes, "torch", None)


def generator_noise(shape: tuple[int, ...], classes: int) -> nn.Module:
    return GeneratorNoise(shape[0], classes)


class DrawnTemperature(nn.Module):
    """A network (run once for a group) that divides its logits by a temperature drawn at construction
    from torch's generator, a Python float: each trial's its own."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.temperature = 0.5 + float(torch.rand(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x))) / self.temperature


def drawn_temperature(shape: tuple[int, ...], classes: int) -> nn.Module:
    return DrawnTemperature(shape[0], classes)


class ChunkedSilu(nn.Module):
    """A hidden layer of 12 whose batch's values are taken in rows of 28 (rows straddling samples)
    for a SiLU, where its batch's values divide into them: in a group of 2 at batch 7, (6, 28), whose
    first axis holds each member's 3 rows and whose second is a multiple of the folded batch 14."""

    def __init__(self, width: int, classes: int, hidden: int = 12, chunk: int = 28) -> None:
        super().__init__()
        self.chunk = chunk
        self.a, self.head = nn.Linear(width, hidden), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if h.numel() % self.chunk == 0:
            h = F.silu(h.reshape(-1, self.chunk)).reshape(h.shape)
        return self.head(h)


def chunked_silu(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ChunkedSilu(shape[0], classes)


class WeightPeakBranch(nn.Module):
    """A network (run once for a group) that halves its hidden layer once its first Linear's largest
    weight magnitude passes 0.25: a branch on a comparison (a bool read into Python), no float read.
    In a group the comparison reads the members' weights at once."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.a(x))
        if self.a.weight.detach().abs().max() > 0.25:
            h = h * 0.5
        return self.head(h)


def weight_peak_branch(shape: tuple[int, ...], classes: int) -> nn.Module:
    return WeightPeakBranch(shape[0], classes)
