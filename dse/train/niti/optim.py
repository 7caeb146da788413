"""The NITI loss module and the mu-bit integer weight update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dse.formats.base import MemberGenerators
from dse.train.niti.exponents import Exponent, _activation_of, _ErrorSlot, _float_dtype, _plain, _value
from dse.train.niti.layers import NitiWeight
from dse.train.niti.ti_loss import integer_ce_error
from dse.train.niti.ti_torch import INT8_BITWIDTH, grad_calc, int_clip, psto_shift

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                weight = self.weights[param]
                if weight.grad is None:
                    continue
                state, bitwidth, frac_bits = self.state[param], group["bitwidth"], group["frac_bits"]
                update = grad_calc(weight.grad[0], group["mu"], bitwidth).to(param.device)
                if frac_bits:
                    accumulator = int_clip(state["accumulator"] - update, bitwidth + frac_bits)
                    state["accumulator"] = accumulator
                    mantissa = psto_shift(accumulator, frac_bits, bitwidth)
                else:
                    mantissa = int_clip(weight.mantissa() - update, bitwidth)
                param.copy_(_value(mantissa, weight.exp, param.dtype))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for weight in self.weights.values():
            weight.grad = None


# ----------------------------------------------------------------------------------------------
# Setup
