"""NITI integer-only training (Wang et al., arXiv 2009.13108), emulated bit-exactly in PyTorch.

Every tensor is an integer mantissa m with |m| <= 2^BITWIDTH - 1 (int8: BITWIDTH = 7) and one
power-of-two exponent e per tensor, value m * 2^e. The emulation carries the value m * 2^e in an
ordinary float tensor (exact) and the exponent beside it, so that the shared training loop, ReLU,
pooling and reshapes run unchanged while every GEMM, shift and update follows the reference code
(wangmaolin/niti, Nov 2021) on exact integers. docs/niti.md says what is exact and what is not.

How the exponent travels:
- forward: a NITI layer returns a `NitiTensor` (a Tensor subclass with `niti_exp`). Ops that keep
  values on the same integer grid (ReLU, max-pooling, views, slicing) keep the tag; anything else
  returns a plain tensor, which the next NITI layer re-quantizes with TiFloatToInt8 (fresh exponent).
- backward: each NITI tensor also carries an `_ErrorSlot`. The NITI consumer of a tensor writes the
  exponent of the error it sends back into that slot; the producer reads it back in its own
  backward. With no (or several) NITI consumers the error is re-quantized with TiFloatToInt8.
- weight gradients: the int32 accumulator is kept exactly (int64) as `param.niti_grad` = (g32, exp);
  `.grad` holds its value g32 * 2^exp in float. `NitiOptimizer` applies the mu-bit update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.errors import InputError
from dse.formats import get as get_format
from dse.formats import shift_round
from dse.formats.base import host_abs_max
from dse.train.accumulation import convolution, convolution_grads
from dse.train.config import TrainConfig, TrainingSetup
from dse.train.layers import Matmul, conv_geometry

INT8_BITWIDTH = 7
"""NITI's BITWIDTH: magnitude bits of an int8 mantissa (the sign takes the eighth)."""
LOG2E_Q15 = 47274
"""log2(e) * 2^15, rounded: NITI's cross-entropy turns base-e logits into base-2 ones with it."""
CE_TOP_LOG2 = 10
"""The integer cross-entropy offsets each row so that its largest base-2 logit is 10."""
CE_STO_SHIFT = 4
"""The cross-entropy error is computed with 4 more bits than it is stored with."""
FLOAT64_EXACT = 2.0**53
FLOAT32_EXACT = 2.0**24


# ----------------------------------------------------------------------------------------------
# Integer primitives (ti_torch.py), on int64 tensors or float tensors holding integers
# ----------------------------------------------------------------------------------------------

def int_clip(m: Tensor, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """NITI's int8_clip: the symmetric range +-(2^bitwidth - 1); -2^bitwidth is never produced."""
    limit = 2**bitwidth - 1
    return m.clamp(-limit, limit)


def range_estimate(t: Tensor) -> int:
    """RangeEstimate: ceil(log2(max|t|)) of an integer-valued tensor, 0 when it is all zeros.

    Exact on the integer maximum (the reference takes log2 of its float32 copy, which can be one
    short just above a power of two beyond 2^24).
    """
    peak = int(host_abs_max(t))
    return (peak - 1).bit_length() if peak > 0 else 0


def _signed(magnitude: Tensor, like: Tensor) -> Tensor:
    return torch.where(like < 0, -magnitude, magnitude)


def round_shift(x: Tensor, shift: int, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """RoundShift: x / 2^shift rounded half away from zero, then clipped (sign-magnitude form).

    Integer tensors are shifted in int64. Float tensors holding integers (the GEMM accumulators)
    are shifted in their own dtype: floor(|x| 2^-shift + 1/2) is exact there, except just below
    2^(bitwidth+1), which the clip maps to the same limit anyway.
    """
    if shift < 0:
        raise ValueError(f"round_shift needs a non-negative shift, got {shift}")
    limit = 2**bitwidth - 1
    if x.is_floating_point():
        if shift == 0:
            return x.clamp(-limit, limit)
        rounded = x.abs().mul_(2.0**-shift).add_(0.5).floor_()
        return rounded.copysign_(x).clamp_(-limit, limit)
    x = x.to(torch.int64)
    magnitude = x.abs()
    if shift > 0:
        magnitude = (magnitude + (1 << (shift - 1))) >> shift
    return int_clip(_signed(magnitude, x), bitwidth)


def psto_shift(x: Tensor, shift: int, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """PstoShift: pseudo-stochastic rounding; the low half of the discarded bits is the random draw."""
    if shift < 0:
        raise ValueError(f"psto_shift needs a non-negative shift, got {shift}")
    x = x.to(torch.int64)
    return int_clip(_signed(shift_round(x.abs(), shift, "pseudo_stochastic"), x), bitwidth)


def sto_shift(x: Tensor, shift: int, generator: torch.Generator | None,
              bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """StoShift: round |x| / 2^shift up iff its discarded bits r exceed a uniform draw in [0, 2^shift).

    The draw is one `torch.randint(0, 2**shift, x.shape, dtype=int64, generator=generator)` on the
    generator's device, so a run is reproducible from the generator's seed.
    """
    x = x.to(torch.int64)
    magnitude = x.abs()
    kept = magnitude >> shift
    discarded = magnitude - (kept << shift)
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randint(0, 2**shift, tuple(x.shape), dtype=torch.int64, generator=generator,
                         device=device).to(x.device)
    return int_clip(_signed(kept + (discarded > draw).to(torch.int64), x), bitwidth)


def _ceil_log2(peak: float) -> int:
    """ceil(log2(peak)) for a positive finite float, exactly (frexp instead of a rounded log2)."""
    mantissa, exponent = math.frexp(peak)
    return exponent - 1 if mantissa == 0.5 else exponent


def _float_to_int(x: Tensor, bitwidth: int) -> tuple[Tensor, int]:
    """TiFloatToInt8 with the mantissa left in a float tensor (float32 when that is exact)."""
    values = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if not values.is_floating_point():
        values = values.double()
    peak = host_abs_max(values)
    if peak == 0.0:
        return torch.zeros_like(values), 0
    exp = _ceil_log2(peak) - bitwidth
    if values.dtype != torch.float32 or abs(exp) > 100:  # keep the power-of-two scaling exact
        values = values.double()
    mantissa = torch.round(values * 2.0**-exp).clamp(-(2**bitwidth), 2**bitwidth - 1)
    return mantissa, exp


def float_to_int(x: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """TiFloatToInt8: b = ceil(log2 max|x|), e = b - bitwidth, m = clamp(round(x * 2^-e)).

    Rounding is torch.round (half to even) and the clamp is [-2^bitwidth, 2^bitwidth - 1], as in
    the reference; an all-zero tensor gives m = 0, e = 0. Non-finite entries are treated as 0.
    Returns (m as int64, e).
    """
    mantissa, exp = _float_to_int(x, bitwidth)
    return mantissa.to(torch.int64), exp


def weight_quant(w: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """NITI's weight init: m = round(w / max|w| * (2^bitwidth - 1)), e = ceil(log2 max|w|) - bitwidth.

    m is normalised by max|w| rather than 2^b, so m * 2^e is a slightly rescaled w (as in the
    reference). The division and multiplication run in w's own dtype, like the reference.
    """
    peak = float(w.detach().abs().max())
    if not math.isfinite(peak) or peak == 0.0:
        raise ValueError(f"weight_quant needs a finite, non-zero weight tensor, got max|w| = {peak}")
    mantissa = torch.round(w.detach() / peak * (2**bitwidth - 1))
    return mantissa.to(torch.int64), _ceil_log2(peak) - bitwidth


def act_calc(acc: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """act_calc / err_calc: shift an integer accumulator back to `bitwidth` bits with RoundShift.

    s = RangeEstimate(acc) - bitwidth; s > 0 gives RoundShift(acc, s), otherwise acc as it is
    (clipped, where the reference's int8 cast would wrap +128 to -128). Returns (m, max(s, 0)),
    m in acc's dtype (int64, or a float tensor holding integers).
    """
    shift = range_estimate(acc) - bitwidth
    if shift > 0:
        return round_shift(acc, shift, bitwidth), shift
    return int_clip(acc, bitwidth), 0


def grad_calc(g32: Tensor, mu: int, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """grad_calc (2021 code): renormalise the weight gradient to mu bits, whatever its size.

    b = RangeEstimate(g32): b == 0 gives zeros, b - mu < 1 gives g32 itself (clipped), otherwise
    PstoShift(g32, b - mu). mu plays the role of the learning rate.
    """
    g32 = g32.to(torch.int64)
    b = range_estimate(g32)
    if b == 0:
        return torch.zeros_like(g32)
    if b - mu < 1:
        return int_clip(g32, bitwidth)
    return psto_shift(g32, b - mu, bitwidth)


# ----------------------------------------------------------------------------------------------
# Integer cross-entropy backward (ti_loss.py)
# ----------------------------------------------------------------------------------------------

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


def integer_ce_error(logits: Tensor, exp: int, targets: Tensor, generator: torch.Generator | None,
                     bitwidth: int = INT8_BITWIDTH, division: str = "reference") -> Tensor:
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
    """
    if division not in CE_DIVISIONS:
        raise ValueError(f"unknown cross-entropy division {division!r}: expected one of {CE_DIVISIONS}")
    z = logits.to(torch.int64)
    rows, classes = z.shape
    scale_bits = bitwidth + CE_STO_SHIFT
    targets = targets.to(torch.int64).reshape(rows)
    ignored = targets < 0
    safe_targets = targets.clamp(min=0)
    if division == "reference":
        p = _reference_ce_numerators(z, exp, bitwidth, scale_bits)
    elif exp > -bitwidth:
        s = _trunc_shift(z * LOG2E_Q15, 15)
        # Any exponent >= 4 already spreads distinct logits more than CE_TOP_LOG2 apart.
        s = s << min(exp, 8) if exp >= 0 else _trunc_shift(s, -exp)
        s = s - (s.max(dim=1, keepdim=True).values - CE_TOP_LOG2)
        numerators = (1 << s.clamp(min=0)) - 1
        p = (numerators << scale_bits) // numerators.sum(dim=1, keepdim=True)
    else:
        numerators = _taylor_numerators(z, exp)
        if isinstance(numerators, Tensor):
            p = (numerators << scale_bits) // numerators.sum(dim=1, keepdim=True)
        else:
            p = torch.tensor([[(n << scale_bits) // sum(row) for n in row] for row in numerators],
                             dtype=torch.int64, device=z.device)
    row_index = torch.arange(rows, device=z.device)
    if division == "reference":  # out_grad[i, t] -= out_grad.sum(1, dtype=int64); .type(int32)
        p[row_index, safe_targets] -= p.to(torch.int64).sum(dim=1).to(p.dtype)
        p = p.trunc().to(torch.int64)
    else:
        p[row_index, safe_targets] -= p.sum(dim=1)
    error = sto_shift(p, CE_STO_SHIFT, generator, bitwidth)
    return torch.where(ignored.view(rows, 1), torch.zeros_like(error), error)


def _reference_ce_numerators(z: Tensor, exp: int, bitwidth: int, scale_bits: int) -> Tensor:
    """p = n * 2^scale_bits / sum_row n as ti_loss.py computes it under PyTorch 1.7, in float32.

    z * 47274 is exact in int64; `/ 2**15` is true division (float32), so s keeps its fraction,
    2**s - 1 is a float32 numerator, `sum(1, dtype=int64)` casts each numerator to int64 before
    adding, and p stays float32 until the caller's final cast.
    """
    if exp > -bitwidth:
        s = (z * LOG2E_Q15).to(torch.float32) / 2**15
        s = s * 2.0**exp if exp >= 0 else s / 2.0**-exp
        s = s - (s.max(dim=1, keepdim=True).values - CE_TOP_LOG2)
        numerators = torch.pow(2.0, s.clamp(min=0.0)) - 1
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
# ----------------------------------------------------------------------------------------------

class _ErrorSlot:
    """Where the NITI consumer of a tensor leaves the exponent of the error it sends back."""

    __slots__ = ("exp", "writers")

    def __init__(self) -> None:
        self.exp: int | None = None
        self.writers = 0

    def write(self, exp: int) -> None:
        self.exp = exp
        self.writers += 1

    def read(self) -> int | None:
        """The error exponent, if exactly one NITI consumer wrote it (several errors were summed)."""
        return self.exp if self.writers == 1 else None


class NitiTensor(Tensor):
    """A float tensor holding m * 2^niti_exp exactly, m the integer mantissa of a NITI tensor.

    Ops that keep values on the same grid keep the tag; every other op returns a plain tensor.
    """

    niti_exp: int
    niti_slot: _ErrorSlot | None

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func not in _GRID_PRESERVING and not _is_zero_pad(func, args, kwargs):
            return out
        source = next((a for a in args if isinstance(a, NitiTensor)), None)
        if source is None:
            return out
        if func is Tensor.__iter__:  # `q, k, v = t` unpacks along dim 0
            return iter(_tag_outputs(tuple(out), source.niti_exp, source.niti_slot))
        return _tag_outputs(out, source.niti_exp, source.niti_slot)


def _tag(t: Tensor, exp: int, slot: _ErrorSlot | None) -> NitiTensor:
    tagged = t.as_subclass(NitiTensor)
    tagged.niti_exp = exp
    tagged.niti_slot = slot
    return tagged


def _tag_outputs(out: Any, exp: int, slot: _ErrorSlot | None) -> Any:
    if isinstance(out, Tensor) and out.is_floating_point():
        return _tag(out, exp, slot)
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_tag_outputs(o, exp, slot) for o in out)
    if isinstance(out, list):
        return [_tag_outputs(o, exp, slot) for o in out]
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):  # named tuple (values, indices)
        return type(out)(_tag_outputs(out[0], exp, slot), *out[1:])
    return out


def _grid_preserving() -> set[Callable]:
    """Ops whose outputs are entries (or maxima) of their input: the exponent still applies."""
    T = Tensor
    names = [
        (F, "relu"), (F, "relu_"), (torch, "relu"), (torch, "relu_"), (T, "relu"), (T, "relu_"),
        (F, "max_pool1d"), (F, "max_pool2d"), (F, "max_pool3d"), (F, "max_pool1d_with_indices"),
        (F, "max_pool2d_with_indices"), (F, "max_pool3d_with_indices"), (F, "adaptive_max_pool1d"),
        (F, "adaptive_max_pool2d"), (torch, "max_pool1d"), (torch, "max_pool2d"),
        (T, "view"), (T, "view_as"), (T, "reshape"), (T, "reshape_as"), (torch, "reshape"),
        (T, "flatten"), (torch, "flatten"), (T, "unflatten"), (torch, "unflatten"),
        (T, "permute"), (torch, "permute"), (T, "transpose"), (torch, "transpose"), (T, "t"),
        (T, "contiguous"), (T, "clone"), (torch, "clone"), (T, "detach"),
        (T, "squeeze"), (torch, "squeeze"), (T, "unsqueeze"), (torch, "unsqueeze"),
        (T, "__getitem__"), (T, "narrow"), (torch, "narrow"), (T, "split"), (torch, "split"),
        (T, "chunk"), (torch, "chunk"), (T, "unbind"), (torch, "unbind"), (T, "expand"),
        (T, "expand_as"), (T, "flip"), (torch, "flip"), (T, "float"), (T, "__iter__"),
    ]
    return {getattr(owner, name) for owner, name in names if hasattr(owner, name)}


_GRID_PRESERVING = _grid_preserving()


def _is_zero_pad(func: Callable, args: Sequence, kwargs: dict) -> bool:
    if func is not F.pad:
        return False
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode == "constant" and not value


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor) if isinstance(t, NitiTensor) else t


def _mantissa_of(values: Tensor, exp: int | None, bitwidth: int) -> tuple[Tensor, int]:
    """(m, e) of a tensor: the tagged exponent when the values sit on its grid, else TiFloatToInt8.

    m is a float32 tensor holding the integers (exact: |m| <= 2^15).
    """
    values = _plain(values).detach()
    if exp is not None and abs(exp) <= 100 and values.dtype == torch.float32:
        mantissa = values * 2.0**-exp  # exact: a power-of-two scaling inside float32's range
        if torch.equal(mantissa, torch.round(mantissa)) and host_abs_max(mantissa) <= 2**bitwidth:
            return mantissa, exp
    mantissa, exp = _float_to_int(values, bitwidth)
    return mantissa.to(torch.float32), exp


def _activation_of(x: Tensor, bitwidth: int) -> tuple[Tensor, int, _ErrorSlot | None]:
    exp = getattr(x, "niti_exp", None) if isinstance(x, NitiTensor) else None
    slot = getattr(x, "niti_slot", None) if isinstance(x, NitiTensor) else None
    mantissa, exp = _mantissa_of(x, exp, bitwidth)
    return mantissa, exp, slot


def _error_of(grad: Tensor, slot: _ErrorSlot | None, bitwidth: int) -> tuple[Tensor, int]:
    return _mantissa_of(grad, slot.read() if slot is not None else None, bitwidth)


def _value(mantissa: Tensor, exp: int, dtype: torch.dtype) -> Tensor:
    """mantissa * 2^exp in `dtype` (exact while the value stays inside dtype's normal range)."""
    if abs(exp) <= 100 and dtype in (torch.float32, torch.float64):
        return mantissa.to(dtype) * 2.0**exp
    return (mantissa.double() * 2.0**exp).to(dtype)


def _mantissa_bound(bitwidth: int) -> float:
    """The largest |product| of two mantissas (TiFloatToInt8 may give -2^bitwidth)."""
    return float(4**bitwidth)


def _exact_dtype(bound: float) -> torch.dtype:
    """float32 when every partial sum stays below 2^24 (exact), float64 below 2^53."""
    if bound < FLOAT32_EXACT:
        return torch.float32
    if bound < FLOAT64_EXACT:
        return torch.float64
    raise ValueError(f"integer GEMM too large to emulate exactly (|sum| bound {bound:.3g} >= 2^53)")


def _accumulate_grad(param: Tensor, g32: Tensor, exp: int) -> None:
    """Add an int32 weight-gradient accumulator to param.niti_grad, aligning exponents exactly."""
    g32 = g32.to(torch.int64)
    pending = getattr(param, "niti_grad", None)
    if pending is None:
        param.niti_grad = (g32, exp)
        return
    previous, previous_exp = pending
    low = min(previous_exp, exp)
    param.niti_grad = ((previous << (previous_exp - low)) + (g32 << (exp - low)), low)


def _float_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


# ----------------------------------------------------------------------------------------------
# NITI layers
# ----------------------------------------------------------------------------------------------

def weight_mantissa(param: Tensor, exp: int | None = None, dtype: torch.dtype = torch.int64) -> Tensor:
    """The integer mantissa of a NITI weight, as `dtype`: its value is mantissa * 2^exp (default
    param.niti_exp). Within _value's exponent range the scaling by 2^-exp is exact in the weight's
    own dtype, so only the float64 fallback needs a wider copy."""
    exp = param.niti_exp if exp is None else exp
    weight = param.detach()
    if not (abs(exp) <= 100 and weight.dtype in (torch.float32, torch.float64)):
        weight = weight.double()
    return (weight * 2.0**-exp).round_().to(dtype)


def _init_weight(param: nn.Parameter, bitwidth: int, generator: torch.Generator) -> int:
    """NITI's initial weights (ti_torch.py UniformWeights, Nov 2021): Xavier-uniform drawn from the
    run's generator, then weight_quant; returns the weight exponent.

    The model's own initialisation is replaced, as the reference draws its own: the exponent fixed
    here bounds the weights for the whole run, so the initial scale matters (docs/niti.md). The
    exponent is also left on the parameter (`niti_exp`) for the optimizer; a parameter shared by two
    layers is initialised once.
    """
    if getattr(param, "niti_bitwidth", None) == bitwidth:
        return param.niti_exp
    with torch.no_grad():
        nn.init.xavier_uniform_(param, generator=generator)
        mantissa, exp = weight_quant(param, bitwidth)
        param.copy_(_value(mantissa, exp, param.dtype))
    param.niti_exp = exp
    param.niti_bitwidth = bitwidth
    param.niti_grad = None
    return exp


def _freeze_bias(bias: nn.Parameter | None) -> None:
    """NITI nets have no biases: a layer's bias is set to zero and frozen (docs/niti.md)."""
    if bias is not None:
        with torch.no_grad():
            bias.zero_()
        bias.requires_grad_(False)


class _IntegerGemm(Protocol):
    """What _GemmFunction needs of a layer: its width, weight exponent and three exact GEMMs."""

    bitwidth: int
    weight_exp: int

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor: ...

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor: ...

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor: ...


class _GemmFunction(torch.autograd.Function):
    """One NITI GEMM layer: int8 x int8 -> int32, RoundShift back to int8, exponent bookkeeping."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, layer: _IntegerGemm, m_x: Tensor, exp_x: int,
                in_slot: _ErrorSlot | None, info: dict) -> Tensor:
        m_w = weight_mantissa(weight, layer.weight_exp, torch.float32)
        acc = layer.int_forward(m_x, m_w)
        m_out, shift = act_calc(acc, layer.bitwidth)
        exp_out = exp_x + layer.weight_exp + shift
        out_slot = _ErrorSlot()
        info["exp"], info["slot"] = exp_out, out_slot
        ctx.layer, ctx.weight, ctx.m_x, ctx.m_w = layer, weight, m_x, m_w
        ctx.exp_x, ctx.in_slot, ctx.out_slot = exp_x, in_slot, out_slot
        return _value(m_out, exp_out, _float_dtype(x))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        layer, weight = ctx.layer, ctx.weight
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, layer.bitwidth)
        grad_x = None
        if ctx.needs_input_grad[0]:
            acc = layer.int_input_grad(m_err, ctx.m_w, ctx.m_x)
            err_out, shift = act_calc(acc, layer.bitwidth)
            exp_out = exp_err + layer.weight_exp + shift
            if ctx.in_slot is not None:
                ctx.in_slot.write(exp_out)
            grad_x = _value(err_out, exp_out, grad_out.dtype)
        g32 = layer.int_weight_grad(m_err, ctx.m_x, ctx.m_w).to(torch.int64)
        _accumulate_grad(weight, g32, exp_err + ctx.exp_x)
        grad_w = _value(g32, exp_err + ctx.exp_x, weight.dtype)
        return grad_x, grad_w, None, None, None, None, None


class _NitiGemm(nn.Module):
    """Shared forward of the weight layers: read the input's (m, e), run the integer GEMM, tag."""

    weight: nn.Parameter
    weight_exp: int
    bitwidth: int

    def forward(self, x: Tensor) -> Tensor:
        m_x, exp_x, slot = _activation_of(x, self.bitwidth)
        info: dict = {}
        out = _GemmFunction.apply(_plain(x), self.weight, self, m_x, exp_x, slot, info)
        return _tag(out, info["exp"], info["slot"])


class NitiLinear(_NitiGemm):
    """nn.Linear as NITI's TiLinear (no bias: the original bias is zeroed and frozen)."""

    def __init__(self, linear: nn.Linear, bitwidth: int, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bitwidth = linear.in_features, linear.out_features, bitwidth
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_exp = _init_weight(self.weight, bitwidth, generator)
        _freeze_bias(self.bias)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        dtype = _exact_dtype(self.in_features * _mantissa_bound(self.bitwidth))
        return m_x.to(dtype) @ m_w.to(dtype).t()

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        dtype = _exact_dtype(self.out_features * _mantissa_bound(self.bitwidth))
        return m_err.to(dtype) @ m_w.to(dtype)

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        rows = m_x.numel() // self.in_features
        dtype = _exact_dtype(rows * _mantissa_bound(self.bitwidth))
        return m_err.reshape(rows, self.out_features).to(dtype).t() @ m_x.reshape(rows, -1).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bitwidth + 1}"


class NitiConv(_NitiGemm):
    """nn.Conv1d/2d/3d as NITI's TiConv2d: integer convolution, exact int32 accumulation, no bias."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bitwidth: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise InputError(f"NITI supports zero-padded convolutions only, got padding_mode="
                             f"{conv.padding_mode!r} in {conv}")
        self.bitwidth = bitwidth
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.padding, prepad = conv_geometry(conv)
        if prepad is not None:  # zero padding: only an asymmetric padding='same' needs a pad first
            raise InputError(f"NITI needs symmetric padding; padding='same' is asymmetric in {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_exp = _init_weight(self.weight, bitwidth, generator)
        _freeze_bias(self.bias)

    def _taps(self) -> int:
        return math.prod(self.kernel_size)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        fan_in = self.weight.shape[1] * self._taps()
        dtype = _exact_dtype(fan_in * _mantissa_bound(self.bitwidth))
        return convolution(m_x.to(dtype), m_w.to(dtype), None, self.stride, self.padding, self.dilation,
                           self.groups)

    def _backward(self, m_err: Tensor, m_x: Tensor, m_w: Tensor, want_input: bool) -> Tensor:
        """The input gradient (want_input) or the weight gradient, each in the narrowest exact dtype."""
        fan_out = self.weight.shape[0] // self.groups * self._taps()
        positions = m_err.numel() // self.weight.shape[0]
        terms = fan_out if want_input else max(fan_out, positions)
        dtype = _exact_dtype(terms * _mantissa_bound(self.bitwidth))
        grad_input, grad_weight = convolution_grads(
            m_err.to(dtype), m_x.to(dtype), m_w.to(dtype), self.stride, self.padding, self.dilation,
            self.groups, want_input, not want_input)
        grad = grad_input if want_input else grad_weight
        assert grad is not None
        return grad

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        return self._backward(m_err, m_x, m_w, want_input=True)

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        return self._backward(m_err, m_x, m_w, want_input=False)

    def extra_repr(self) -> str:
        channels = f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}"
        return (f"{channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, int{self.bitwidth + 1}")


class _MatmulFunction(torch.autograd.Function):
    """a @ b of two NITI activations (attention): integer GEMM forward, both errors backward."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, bitwidth: int, inputs: tuple, info: dict) -> Tensor:
        (m_a, exp_a, slot_a), (m_b, exp_b, slot_b) = inputs
        dtype = _exact_dtype(m_a.shape[-1] * _mantissa_bound(bitwidth))
        m_out, shift = act_calc(m_a.to(dtype) @ m_b.to(dtype), bitwidth)
        exp_out = exp_a + exp_b + shift
        out_slot = _ErrorSlot()
        info["exp"], info["slot"] = exp_out, out_slot
        ctx.bitwidth, ctx.inputs, ctx.out_slot = bitwidth, inputs, out_slot
        return _value(m_out, exp_out, _float_dtype(a))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        (m_a, exp_a, slot_a), (m_b, exp_b, slot_b) = ctx.inputs
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, ctx.bitwidth)
        grads: list[Tensor | None] = [None, None]
        operands = ((m_a, exp_b, slot_a, m_b), (m_b, exp_a, slot_b, m_a))
        for index, (mine, other_exp, slot, other) in enumerate(operands):
            if not ctx.needs_input_grad[index]:
                continue
            # Each gradient entry sums at most this many products (broadcast batches included).
            terms = m_err.numel() // max(1, m_err.shape[-2 if index == 0 else -1])
            dtype = _exact_dtype(terms * _mantissa_bound(ctx.bitwidth))
            if index == 0:  # d(a @ b)/da = err @ b^T
                acc = m_err.to(dtype) @ other.to(dtype).transpose(-1, -2)
            else:  # d(a @ b)/db = a^T @ err
                acc = other.to(dtype).transpose(-1, -2) @ m_err.to(dtype)
            acc = acc.sum_to_size(mine.shape)
            err, shift = act_calc(acc, ctx.bitwidth)
            exp_out = exp_err + other_exp + shift
            if slot is not None:
                slot.write(exp_out)
            grads[index] = _value(err, exp_out, grad_out.dtype)
        return grads[0], grads[1], None, None, None


class NitiMatmul(nn.Module):
    """dse.train.layers.Matmul (attention's a @ b) as a NITI integer GEMM."""

    def __init__(self, bitwidth: int) -> None:
        super().__init__()
        self.bitwidth = bitwidth

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        inputs = (_activation_of(a, self.bitwidth), _activation_of(b, self.bitwidth))
        info: dict = {}
        out = _MatmulFunction.apply(_plain(a), _plain(b), self.bitwidth, inputs, info)
        return _tag(out, info["exp"], info["slot"])


class _EmbeddingFunction(torch.autograd.Function):
    """A table lookup is a GEMM with a one-hot input: rows of m_w with exponent e_w, exact."""

    @staticmethod
    def forward(ctx: Any, indices: Tensor, weight: Tensor, layer: NitiEmbedding, info: dict) -> Tensor:
        out_slot = _ErrorSlot()
        info["exp"], info["slot"] = layer.weight_exp, out_slot
        ctx.layer, ctx.weight, ctx.indices, ctx.out_slot = layer, weight, indices, out_slot
        return weight.detach()[indices].clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        weight, layer = ctx.weight, ctx.layer
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, layer.bitwidth)
        rows = m_err.reshape(-1, weight.shape[1]).double()
        g32 = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
        g32.index_add_(0, ctx.indices.reshape(-1), rows)
        if layer.padding_idx is not None:
            g32[layer.padding_idx] = 0
        _accumulate_grad(weight, g32.to(torch.int64), exp_err)
        return None, _value(g32, exp_err, weight.dtype), None, None


class NitiEmbedding(nn.Module):
    """nn.Embedding as an integer table updated by the NITI rule (a one-hot GEMM; not in the paper)."""

    def __init__(self, embedding: nn.Embedding, bitwidth: int, generator: torch.Generator) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise InputError(f"NITI cannot renormalise embeddings: max_norm={embedding.max_norm} "
                             f"in {embedding}")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.bitwidth = embedding.padding_idx, bitwidth
        self.weight = embedding.weight
        self.weight_exp = _init_weight(self.weight, bitwidth, generator)

    def forward(self, indices: Tensor) -> Tensor:
        info: dict = {}
        out = _EmbeddingFunction.apply(indices, self.weight, self, info)
        return _tag(out, info["exp"], info["slot"])


# ----------------------------------------------------------------------------------------------
# Loss and optimizer
# ----------------------------------------------------------------------------------------------

class _CrossEntropyFunction(torch.autograd.Function):
    """Float cross-entropy value forward (for logging); NITI's integer error backward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, loss: NitiCrossEntropy, m_z: Tensor,
                exp_z: int, slot: _ErrorSlot | None) -> Tensor:
        ctx.loss, ctx.m_z, ctx.exp_z, ctx.slot, ctx.targets = loss, m_z, exp_z, slot, targets
        ctx.shape = logits.shape
        values = _value(m_z, exp_z, torch.float64)
        return F.cross_entropy(values, targets, ignore_index=-100).to(_float_dtype(logits))

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        loss = ctx.loss
        error = integer_ce_error(ctx.m_z, ctx.exp_z, ctx.targets, loss.generator, loss.bitwidth,
                                 loss.division)
        if ctx.slot is not None:
            ctx.slot.write(0)
        # The integer error does not scale with grad_loss: NITI renormalises every tensor anyway.
        return _value(error, 0, grad_loss.dtype).reshape(ctx.shape), None, None, None, None, None


class NitiCrossEntropy:
    """loss_fn(logits, targets): float cross-entropy value, NITI's integer error as its gradient.

    Logits (rows, classes) or sequences (B, T, V) with targets (B, T), flattened to rows; targets
    of -100 are ignored. The stochastic rounding of the error draws from `generator`.
    """

    def __init__(self, bitwidth: int = INT8_BITWIDTH, generator: torch.Generator | None = None,
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

    def __init__(self, params: Any, mu: int, bitwidth: int = INT8_BITWIDTH, copy_bits: int | None = None
                 ) -> None:
        frac_bits = 0 if copy_bits is None else copy_bits - bitwidth - 1
        if frac_bits < 0:
            raise ValueError(f"a NITI weight accumulator is wider than the weights (int{bitwidth + 1}), "
                             f"got int{copy_bits}")
        super().__init__(params, {"mu": mu, "bitwidth": bitwidth, "frac_bits": frac_bits})
        for group in self.param_groups:
            for param in group["params"]:
                if not hasattr(param, "niti_exp"):
                    raise ValueError("NitiOptimizer needs weights prepared by a NITI layer (no niti_exp)")
                self.state[param]["exp"] = param.niti_exp
                if frac_bits:
                    self.state[param]["accumulator"] = weight_mantissa(param) << frac_bits

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                pending = getattr(param, "niti_grad", None)
                if pending is None:
                    continue
                state, bitwidth, frac_bits = self.state[param], group["bitwidth"], group["frac_bits"]
                update = grad_calc(pending[0], group["mu"], bitwidth).to(param.device)
                if frac_bits:
                    accumulator = int_clip(state["accumulator"] - update, bitwidth + frac_bits)
                    state["accumulator"] = accumulator
                    mantissa = psto_shift(accumulator, frac_bits, bitwidth)
                else:
                    mantissa = int_clip(weight_mantissa(param, state["exp"]) - update, bitwidth)
                param.copy_(_value(mantissa, state["exp"], param.dtype))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                param.niti_grad = None


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

_FORMAT_FIELDS = ("format", "weights", "activations", "gradients", "weight_grads")


def check_niti(config: TrainConfig) -> int:
    """NITI's BITWIDTH from the config's integer format (int(n) -> n - 1), after checking that the
    config can run under NITI at all; InputError otherwise."""
    given = {name: getattr(config, name) for name in _FORMAT_FIELDS if getattr(config, name) is not None}
    if not given:
        raise InputError("NITI needs an integer format such as format='int8', got none (fp32)")
    widths = set()
    for name, spec in given.items():
        fmt = get_format(spec)
        if fmt.family != "int":
            raise InputError(f"NITI needs an integer format, got {name}={spec!r} (family '{fmt.family}')")
        widths.add(fmt.bits)
    if len(widths) > 1:
        listed = ", ".join(f"{name}={spec!r}" for name, spec in given.items())
        raise InputError(f"NITI uses one integer width for every tensor, got {listed}")
    bits = widths.pop()
    if not 2 <= bits <= 16:
        raise InputError(f"NITI supports int2..int16, got int{bits} (format fields {given})")
    if not 1 <= config.niti_mu <= 31:
        raise InputError(f"niti_mu must be in 1..31 (bits of the integer update), got {config.niti_mu}")
    niti_copy_bits(config, bits)
    return bits - 1


def niti_copy_bits(config: TrainConfig, bits: int) -> int | None:
    """The width of NITI's integer weight accumulator (master_weights 'int16': int16), or None when
    the weights are updated in place (master_weights true or false: NITI keeps no float copy)."""
    master = config.master_weights
    if not isinstance(master, str):
        return None
    try:
        fmt = get_format(master)
    except ValueError as error:
        raise InputError(f"config master_weights: {str(error).splitlines()[0]}") from None
    copy_bits = fmt.bits
    if fmt.family != "int" or not bits < copy_bits <= 32:
        raise InputError(f"NITI keeps its weight accumulator as a wider integer (int{bits + 1}..int32, e.g. "
                         f"int16: the reference's 8 extra fraction bits), got master_weights {master!r}")
    return copy_bits


def niti_mu_for_epoch(mu: int, epoch: int, epochs: int) -> int:
    """The paper's regime (mu = 5, 4, 3 from epochs 0, 100, 150 of 200) scaled to `epochs`."""
    return mu - int(2 * epoch >= epochs) - int(4 * epoch >= 3 * epochs)


def convert_model(model: nn.Module, bitwidth: int, generator: torch.Generator) -> list[nn.Module]:
    """Swap Linear, Conv1d/2d/3d, Embedding and Matmul modules for NITI layers, in place.

    The NITI layers keep the original parameter objects. nn.MultiheadAttention is left alone (its
    projections are not called as modules). Returns the new layers in model order.
    """
    converted: list[nn.Module] = []

    def replacement(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear):
            return NitiLinear(child, bitwidth, generator)
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return NitiConv(child, bitwidth, generator)
        if isinstance(child, nn.Embedding):
            return NitiEmbedding(child, bitwidth, generator)
        if isinstance(child, Matmul):
            return NitiMatmul(bitwidth)
        return None

    def visit(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                continue
            new = replacement(child)
            if new is None:
                visit(child)
            else:
                setattr(module, name, new)
                converted.append(new)

    if replacement(model) is not None:
        raise InputError(f"NITI converts the layers inside a model; got a bare {type(model).__name__}")
    visit(model)
    return converted


def niti_setup(model: nn.Module, config: TrainConfig, generator: torch.Generator) -> TrainingSetup:
    """Turn `model` into a NITI integer network in place; return its loss, optimizer and mu schedule.

    Every parameter outside a NITI layer (biases, LayerNorm, free-standing embeddings) is frozen;
    master_weights applies only as an integer accumulator ('int16'); lr, momentum, weight_decay,
    rounding and full_precision_layers do not apply.
    """
    bitwidth = check_niti(config)
    layers = convert_model(model, bitwidth, generator)
    weights: dict[int, nn.Parameter] = {}
    for layer in layers:
        if isinstance(layer, (NitiLinear, NitiConv, NitiEmbedding)):
            weights.setdefault(id(layer.weight), layer.weight)
    if not weights:
        raise InputError(f"NITI found no Linear, Conv or Embedding layer to train in {type(model).__name__}")
    for param in model.parameters():
        if id(param) not in weights:
            param.requires_grad_(False)
    optimizer = NitiOptimizer(list(weights.values()), mu=config.niti_mu, bitwidth=bitwidth,
                              copy_bits=niti_copy_bits(config, bitwidth + 1))
    start_mu, epochs = config.niti_mu, config.epochs

    def on_epoch_start(epoch: int) -> None:
        for group in optimizer.param_groups:
            group["mu"] = niti_mu_for_epoch(start_mu, epoch, epochs)

    # The reference evaluates at its training batch size (main.py, data.py: one BATCH_SIZE).
    return TrainingSetup(model=model, loss_fn=NitiCrossEntropy(bitwidth, generator), optimizer=optimizer,
                         on_epoch_start=on_epoch_start, eval_batch=config.batch_size)
