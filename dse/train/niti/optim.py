"""The NITI loss module and the mu-bit integer weight update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dse.formats.base import MemberGenerators
from dse.train.niti.exponents import (
    _EXACT_SCALING,
    Exponent,
    _activation_of,
    _ErrorSlot,
    _float_dtype,
    _plain,
    _value,
)
from dse.train.niti.layers import NitiWeight, weight_mantissa
from dse.train.niti.ti_loss import integer_ce_error
from dse.train.niti.ti_torch import INT8_BITWIDTH, grad_calc, int_clip, psto_shift
from dse.train.optim import closure_loss

# ----------------------------------------------------------------------------------------------

class _CrossEntropyFunction(torch.autograd.Function):
    """Float cross-entropy value forward (for logging); NITI's integer error backward. Stacked logits
    (G, rows, classes) with an exponent per member give each member's loss (G,) and error."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, loss: NitiCrossEntropy, m_z: Tensor,
                exp_z: Exponent, slot: _ErrorSlot | None) -> Tensor:
        ctx.loss, ctx.m_z, ctx.exp_z, ctx.slot, ctx.targets = loss, m_z, exp_z, slot, targets
        ctx.shape = logits.shape
        values = _value(m_z, exp_z, torch.float64)
        if isinstance(exp_z, tuple):
            losses = [F.cross_entropy(v, t, ignore_index=-100) for v, t in zip(values, targets, strict=True)]
            return torch.stack(losses).to(_float_dtype(logits))
        return F.cross_entropy(values, targets, ignore_index=-100).to(_float_dtype(logits))

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        loss: NitiCrossEntropy = ctx.loss
        error = integer_ce_error(ctx.m_z, ctx.exp_z, ctx.targets, loss.generator, loss.bitwidth,
                                 loss.division)
        zero: Exponent = (0,) * len(ctx.exp_z) if isinstance(ctx.exp_z, tuple) else 0
        if ctx.slot is not None:
            ctx.slot.write(zero)
        # The integer error does not scale with grad_loss: NITI renormalises every tensor anyway.
        return _value(error, zero, grad_loss.dtype).reshape(ctx.shape), None, None, None, None, None


class NitiCrossEntropy:
    """loss_fn(logits, targets): float cross-entropy value, NITI's integer error as its gradient.

    Logits (rows, classes) or sequences (B, T, V) with targets (B, T), flattened to rows; targets
    of -100 are ignored. The stochastic rounding of the error draws from `generator` (each member's
    from its own where the logits are stacked: stacked.StackedNitiCrossEntropy).
    """

    def __init__(self, bitwidth: int = INT8_BITWIDTH,
                 generator: torch.Generator | MemberGenerators | None = None,
                 division: str = "reference") -> None:
        self.bitwidth, self.generator, self.division = bitwidth, generator, division

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        classes = logits.shape[-1]
        rows = _plain(logits).reshape(-1, classes)
        flat_targets = targets.reshape(-1)
        if flat_targets.numel() != rows.shape[0]:
            raise ValueError(f"NITI loss: {tuple(logits.shape)} logits do not match {tuple(targets.shape)} "
                             "targets")
        m_z, exp_z, slot = _activation_of(logits, self.bitwidth)
        return _CrossEntropyFunction.apply(_plain(logits), flat_targets, self, m_z.reshape(-1, classes),
                                           exp_z, slot)


def step_weight_(param: Tensor, g32: Tensor, exp: Exponent, mu: int | Sequence[int], bitwidth: int) -> None:
    """NITI's update of a weight in place (per member where `exp` is a tuple: param and g32 stacked
    along a leading member axis, one mu each): m = clip(m - grad_calc(g32, mu)) for the mantissa m of
    param = m * 2^exp, as `reference_step_weight_` computes it in int64, bit for bit.

    It runs in int32 and in param's dtype, in place, in about a dozen passes against the
    reference's two dozen int64 ones: |g32| is below 2^31 (a NITI GEMM's sums stay below 2^24), so
    PstoShift's shifts, masks and comparison hold in int32; param is m * 2^exp exactly (every write
    to it is one), so the new weight is param - update * 2^exp, clamped to +-(2^bitwidth - 1) * 2^exp,
    exact in float32 and float64 while 2^exp lies within `_EXACT_SCALING`. Elsewhere (a wider
    g32, other dtypes or exponents) the reference runs.
    """
    members = isinstance(exp, tuple)
    exps = exp if isinstance(exp, tuple) else (exp,)
    mus = tuple(mu) if not isinstance(mu, int) else (mu,) * len(exps)
    flat = g32.reshape(len(exps), -1)
    low, high = torch.aminmax(flat, dim=1) if members else (t.reshape(1) for t in torch.aminmax(flat))
    peaks = torch.maximum(-low, high).tolist()
    if (param.dtype not in (torch.float32, torch.float64) or max(peaks) >= 2**31
            or max(map(abs, exps)) > _EXACT_SCALING):
        reference_step_weight_(param, g32, exp, mu, bitwidth)
        return
    ranges = [(int(peak) - 1).bit_length() if peak > 0 else 0 for peak in peaks]  # RangeEstimate
    if not any(ranges):  # grad_calc gives zeros: m stays
        return
    shifts = [max(b - m, 0) for b, m in zip(ranges, mus, strict=True)]
    limit = 2**bitwidth - 1
    g = g32.to(torch.int32)
    magnitude = g.abs()
    if members:
        shape = (len(exps), *[1] * (g.dim() - 1))
        shift = torch.tensor(shifts, dtype=torch.int32, device=g.device).view(shape)
        low_bits = shift >> 1
        kept = magnitude >> shift
        field = magnitude.bitwise_and_((1 << shift) - 1)  # the discarded bits
        below = field & ((1 << low_bits) - 1)
        below <<= shift & 1
        field >>= low_bits
    else:
        kept = magnitude >> shifts[0]
        field = magnitude.bitwise_and_((1 << shifts[0]) - 1)
        below = field & ((1 << (shifts[0] >> 1)) - 1)
        if shifts[0] & 1:
            below <<= 1
        field >>= shifts[0] >> 1
    # PstoShift: up where the high half of the discarded bits exceeds the low half
    kept += field > below
    update = kept.clamp_max_(limit).to(param.dtype).copysign_(g)  # int_clip(grad_calc(g32, mu))
    if members:
        scales = torch.tensor([2.0**e for e in exps], dtype=param.dtype, device=param.device).view(shape)
        if not all(ranges):  # a member whose RangeEstimate is 0 gets no update (grad_calc's zeros)
            update.mul_(torch.tensor([float(b > 0) for b in ranges], dtype=param.dtype,
                                     device=param.device).view(shape))
        param.sub_(update.mul_(scales))
        bound = scales.mul_(limit)
        param.clamp_(-bound, bound)
        return
    scale = 2.0**exps[0]
    param.sub_(update, alpha=scale).clamp_(-limit * scale, limit * scale)


def reference_step_weight_(param: Tensor, g32: Tensor, exp: Exponent, mu: int | Sequence[int],
                           bitwidth: int) -> None:
    """`step_weight_` in the reference's int64 arithmetic: grad_calc (per member: with each mu) and
    int_clip on the mantissas, param rewritten from them."""
    if isinstance(exp, tuple):  # each member's grad_calc with its own mu
        mus = [mu] * len(exp) if isinstance(mu, int) else list(mu)
        update = torch.stack([grad_calc(g, m, bitwidth) for g, m in zip(g32, mus, strict=True)])
    else:
        assert isinstance(mu, int)
        update = grad_calc(g32, mu, bitwidth)
    mantissa = int_clip(weight_mantissa(param, exp) - update.to(param.device), bitwidth)
    param.copy_(_value(mantissa, exp, param.dtype))


class NitiOptimizer(torch.optim.Optimizer):
    """NITI's weight update (2021 'vanilla SGD'): w = clip(w - grad_calc(g32, mu)); exponent fixed.

    The group's `mu` (bits of the update) is the learning rate; there is no momentum and no decay.
    `copy_bits` > bitwidth + 1 keeps a wider integer accumulator of each weight, its mantissa with
    F = copy_bits - bitwidth - 1 more fraction bits (the 2020 code's `--weight-frac`, F = 8: "16-bit
    integers for weight accumulation"): the update is subtracted from the accumulator (clipped to
    +-(2^(copy_bits-1) - 1)) and the int8 weight is PstoShift(accumulator, F).
    """

    def __init__(self, weights: Sequence[NitiWeight], mu: int, bitwidth: int = INT8_BITWIDTH,
                 copy_bits: int | None = None) -> None:
        frac_bits = 0 if copy_bits is None else copy_bits - bitwidth - 1
        if frac_bits < 0:
            raise ValueError(f"a NITI weight accumulator is wider than the weights (int{bitwidth + 1}), "
                             f"got int{copy_bits}")
        self.weights = {weight.param: weight for weight in weights}
        super().__init__(list(self.weights), {"mu": mu, "bitwidth": bitwidth, "frac_bits": frac_bits})
        if frac_bits:
            for weight in weights:
                self.state[weight.param]["accumulator"] = weight.mantissa() << frac_bits

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for param in group["params"]:
                weight = self.weights[param]
                if weight.grad is None:
                    continue
                state, bitwidth, frac_bits = self.state[param], group["bitwidth"], group["frac_bits"]
                if not frac_bits:
                    step_weight_(param, weight.grad[0].to(param.device), weight.exp, group["mu"], bitwidth)
                    continue
                update = grad_calc(weight.grad[0], group["mu"], bitwidth).to(param.device)
                accumulator = int_clip(state["accumulator"] - update, bitwidth + frac_bits)
                state["accumulator"] = accumulator
                mantissa = psto_shift(accumulator, frac_bits, bitwidth)
                param.copy_(_value(mantissa, weight.exp, param.dtype))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for weight in self.weights.values():
            weight.grad = None


# ----------------------------------------------------------------------------------------------
# Setup
