"""The integer cross-entropy backward of the reference's niti/ti_loss.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dse.formats.base import MemberGenerators
from dse.train.member_kernels import member_kernel
from dse.train.niti.ti_torch import INT8_BITWIDTH, _signed, sto_shift

# ----------------------------------------------------------------------------------------------

LOG2E_Q15 = 47274
"""log2(e) * 2^15, rounded: NITI's cross-entropy turns base-e logits into base-2 ones with it."""
CE_TOP_LOG2 = 10
"""The integer cross-entropy offsets each row so that its largest base-2 logit is 10."""
CE_STO_SHIFT = 4
"""The cross-entropy error is computed with 4 more bits than it is stored with."""


def _trunc_shift(t: Tensor, shift: int) -> Tensor:
    """t / 2^shift truncated toward zero (integer division as C and PyTorch <= 1.4 do it)."""
    return _signed(t.abs() >> shift, t)


def _taylor_numerators(z: Tensor, exp: int) -> Tensor | list[list[int]]:
    """n = 2^(1-2e) + z 2^(1-e) + z^2, proportional to 1 + x + x^2/2 with x = z 2^e (always > 0)."""
    if 1 - 2 * exp <= 40:
        return (1 << (1 - 2 * exp)) + (z << (1 - exp)) + z * z
    # Beyond int64: the same integers in Python's unbounded ints (the reference would overflow).
    return [[(1 << (1 - 2 * exp)) + (v << (1 - exp)) + v * v for v in row] for row in z.tolist()]


CE_DIVISIONS: tuple[str, ...] = ("reference", "integer")
"""How the integer cross-entropy divides: as the reference runs (PyTorch >= 1.5 `/`: float32 true
division, so s keeps its fraction and 2^s is a float), or truncating integer division throughout."""


def integer_ce_error(logits: Tensor, exp: int | tuple[int, ...], targets: Tensor,
                     generator: torch.Generator | MemberGenerators | None, bitwidth: int = INT8_BITWIDTH,
                     division: str = "reference") -> Tensor:
    """NITI's integer cross-entropy backward: the error (softmax - onehot) as int8 with exponent 0.

    `logits` are the integer mantissas (rows, classes) and `exp` their exponent. Rows whose target
    is negative (ignored) get a zero error. Steps (wangmaolin/niti ti_loss.py, TiLoss.forward):
    1. exp > -bitwidth: s = z * 47274 / 2^15 scaled by 2^exp, offset per row so that max s = 10,
       clamped at 0, numerator n = 2^s - 1.
       Otherwise the second-order Taylor numerator n = 2^(1-2exp) + z 2^(1-exp) + z^2.
    2. p = n * 2^(bitwidth+4) / sum_row n; subtract sum_row p at the target.
    3. StoShift(p - onehot, 4) with one draw per element from `generator`.
    `division` "reference" reads every `/` as the reference's PyTorch 1.7 does (float32 true
    division; the sums cast each term to int64 first, the final cast truncates), "integer" as
    truncating integer division on int64.

    Stacked logits (G, rows, classes) of a group take a tuple of G exponents, targets (G, rows)
    and `MemberGenerators`: each member's error is what it gets alone. Where every member takes
    the reference division's base-2 branch (as training does) the members' rows run as one batch
    of rows, each scaled by its member's exponent; otherwise member by member.
    """
    if division not in CE_DIVISIONS:
        raise ValueError(f"unknown cross-entropy division {division!r}: expected one of {CE_DIVISIONS}")
    shape = logits.shape
    if isinstance(exp, tuple):
        if division != "reference" or min(exp) <= -bitwidth:
            assert isinstance(generator, MemberGenerators)
            return torch.stack([integer_ce_error(logits[g], e, targets[g], generator.generators[g], bitwidth,
                                                 division) for g, e in enumerate(exp)])
        logits, targets = logits.reshape(-1, shape[-1]), targets.reshape(-1)
    z = logits.to(torch.int64)
    rows, classes = z.shape
    scale_bits = bitwidth + CE_STO_SHIFT
    targets = targets.to(torch.int64).reshape(rows)
    ignored = targets < 0
    safe_targets = targets.clamp(min=0)
    if division == "reference":
        p = _reference_ce_numerators(z, exp, bitwidth, scale_bits)
    elif isinstance(exp, tuple):
        raise AssertionError("stacked logits take the reference division here")
    elif exp > -bitwidth:
        s = _trunc_shift(z * LOG2E_Q15, 15)
        # Any exponent >= 4 already spreads distinct logits more than CE_TOP_LOG2 apart.
        s = s << min(exp, 8) if exp >= 0 else _trunc_shift(s, -exp)
        s = s - (s.max(dim=1, keepdim=True).values - CE_TOP_LOG2)
        numerators = (1 << s.clamp(min=0)) - 1
        p = (numerators << scale_bits) // numerators.sum(dim=1, keepdim=True)
    else:
        taylor = _taylor_numerators(z, exp)
        if isinstance(taylor, Tensor):
            p = (taylor << scale_bits) // taylor.sum(dim=1, keepdim=True)
        else:
            p = torch.tensor([[(n << scale_bits) // sum(row) for n in row] for row in taylor],
                             dtype=torch.int64, device=z.device)
    row_index = torch.arange(rows, device=z.device)
    if division == "reference":  # out_grad[i, t] -= out_grad.sum(1, dtype=int64); .type(int32)
        p[row_index, safe_targets] -= p.to(torch.int64).sum(dim=1).to(p.dtype)
        p = p.trunc().to(torch.int64)
    else:
        p[row_index, safe_targets] -= p.sum(dim=1)
    error = sto_shift(p, CE_STO_SHIFT, generator, bitwidth)
    return torch.where(ignored.view(rows, 1), torch.zeros_like(error), error).reshape(shape)


def _times_two_to(s: Tensor, exp: int | tuple[int, ...]) -> Tensor:
    """s * 2^exp as ti_loss.py writes it: a product by 2^exp for exp >= 0, else a quotient by 2^-exp.

    A tuple holds one exponent per member, s (G * rows, classes) member-major: each member's rows
    are multiplied and divided by their own powers (the other factor 1.0), the same exact operation.
    """
    if isinstance(exp, int):
        return s * 2.0**exp if exp >= 0 else s / 2.0**-exp
    rows = s.shape[0] // len(exp)

    def column(factors: list[float]) -> Tensor:
        return torch.tensor(factors, dtype=s.dtype, device=s.device).repeat_interleave(rows).view(-1, 1)

    return s * column([2.0 ** max(e, 0) for e in exp]) / column([2.0 ** max(-e, 0) for e in exp])


def _reference_ce_numerators(z: Tensor, exp: int | tuple[int, ...], bitwidth: int, scale_bits: int) -> Tensor:
    """p = n * 2^scale_bits / sum_row n as ti_loss.py computes it under PyTorch 1.7, in float32.

    z * 47274 is exact in int64; `/ 2**15` is true division (float32), so s keeps its fraction,
    2**s - 1 is a float32 numerator, `sum(1, dtype=int64)` casts each numerator to int64 before
    adding, and p stays float32 until the caller's final cast.
    """
    if isinstance(exp, tuple) or exp > -bitwidth:  # per member: only where every member is above
        s = (z * LOG2E_Q15).to(torch.float32) / 2**15
        s = _times_two_to(s, exp)
        s = s - (s.max(dim=1, keepdim=True).values - CE_TOP_LOG2)
        # pow's vector and scalar kernels differ in the last bit for some s: each member's as alone
        members = len(exp) if isinstance(exp, tuple) else 1
        numerators = member_kernel(lambda t: torch.pow(2.0, t), s.clamp(min=0.0), members) - 1
        total = numerators.to(torch.int64).sum(dim=1, keepdim=True)
        return numerators * 2**scale_bits / total
    taylor = _taylor_numerators(z, exp)
    if isinstance(taylor, Tensor):
        total = taylor.sum(dim=1, keepdim=True)
        return (taylor * 2**scale_bits).to(torch.float32) / total.to(torch.float32)
    # Beyond int64 (the reference would wrap): the same division on Python ints, in float64.
    return torch.tensor([[n * 2**scale_bits / sum(row) for n in row] for row in taylor],
                        dtype=torch.float64, device=z.device)


# ----------------------------------------------------------------------------------------------
# Exponent bookkeeping between layers
