"""Optimizers for quantized training: torch's SGD/Adam/AdamW, Madam and LNS-Madam, plus the
re-quantization of stored weights and optimizer state after every step.

`make_optimizer` builds one from a name and a `QuantPolicy`. After each `step()` a post-step hook
(`StepQuantizer`) rounds the weights of the model's quantized layers into `policy.master_weights` (when
there is no fp32 master copy) and the optimizer's state tensors into `policy.optimizer_state`. LNS-Madam with
weights stored in an LNS format moves each weight's log code by whole steps itself (see `LNSMadam`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dse.errors import InputError
from dse.formats import NumberFormat, check_rounding, round_to_integer
from dse.formats.base import MemberGenerators, random_bits
from dse.formats.lns import LNS
from dse.train.layers import QuantSwitch, quant_switch, stored_weights
from dse.train.member_kernels import PARALLEL_GRAIN
from dse.train.policy import QuantPolicy, TensorQuant

DEFAULT_LR: dict[str, float] = {
    "sgd": 0.05,
    "adam": 1e-3,
    "adamw": 1e-3,
    "madam": 0.01,       # jxbz/madam default
    "lns-madam": 1 / 128,  # jiaweizzhao/lns-madam-optimizer default: one 1/128 step in log2 per unit of g*
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(DEFAULT_LR)

MADAM_OPTIMIZERS: tuple[str, ...] = ("madam", "lns-madam")
"""The multiplicative optimizers (`madam_optimizer`); the others are torch's (`plain_optimizer`)."""

STATE_KEYS: tuple[str, ...] = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""Per-parameter state tensors that are re-quantized with policy.optimizer_state (step counters are not)."""

MADAM_BETA = 0.999
MADAM_ONE_MINUS_BETA = 0.001  # written out: 1 - 0.999 is not 0.001 in floating point

MemberValue = float | Sequence[float]
"""A Madam hyperparameter: one value, or one per member of a stacked group."""


def _per_member(value: MemberValue, members: int, name: str) -> tuple[float, ...]:
    """The value of each member (one for a run alone)."""
    if isinstance(value, (int, float)):
        return (float(value),) * max(members, 1)
    values = tuple(value)
    if len(values) != max(members, 1):
        raise ValueError(f"{name}: {len(values)} values for {members} members")
    return values


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """An optimizer step's `closure` (torch.optim's convention) called with autograd on (a step runs
    under no_grad), its loss returned; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Madam(torch.optim.Optimizer):
    """Madam (Bernstein et al. 2020, jxbz/madam): p <- clamp(p * exp(-lr * g* * sign(p)), +-max).

    Multiplicative, so a weight never changes sign and zero weights stay zero; max is p_scale
    times the RMS of the weights at the first step.

    `members` G > 0 steps a stacked group (dse/train/grouped.py): every parameter holds G runs'
    tensors along its leading axis, and lr, p_scale and g_bound may hold one value per member. Each
    operation then runs once over the stacked tensor, with a (G, 1, ..., 1) tensor where members'
    values differ (a float32 `x * member_tensor` rounds as `x * float` does: the float is rounded to
    float32 first either way), and gives every member what it gives alone, bit for bit
    (tests/train/test_train_optim.py). A run alone is members 0: the same code, the values Python
    floats, so its arithmetic is the reference's. group["lr"] is one float alone, a list per member
    in a group.
    """

    def __init__(self, params: Iterable[Any], lr: MemberValue = DEFAULT_LR["madam"],
                 p_scale: MemberValue = 3.0, g_bound: MemberValue = 10.0, members: int = 0) -> None:
        self.members = members
        self.p_scales = _per_member(p_scale, members, "p_scale")
        self.g_bounds = _per_member(g_bound, members, "g_bound")
        self._constants: dict[tuple[Any, ...], Tensor] = {}
        lrs = _per_member(lr, members, "lr")
        super().__init__(params, {"lr": list(lrs) if members else lrs[0]})

    def member_values(self, values: Sequence[float], like: Tensor, dtype: torch.dtype | None = None
                      ) -> float | Tensor:
        """values[0] when every member has it (always alone: the scalar arithmetic of the reference),
        else the values as a (G, 1, ..., 1) tensor of `dtype` (default like's) that broadcasts
        over the stacked `like`; kept, as values repeat from step to step."""
        first = values[0]
        if all(value == first for value in values):
            return first
        dtype = dtype or like.dtype
        key = (tuple(values), dtype, like.device, like.dim())
        constant = self._constants.get(key)
        if constant is None:
            if len(self._constants) > 256:  # a schedule changes lr every epoch
                self._constants.clear()
            constant = torch.tensor(values, dtype=dtype).view(-1, *[1] * (like.dim() - 1)).to(like.device)
            self._constants[key] = constant
        return constant

    def members_of(self, t: Tensor) -> Sequence[Tensor]:
        """Each member's tensor of a parameter-shaped one (the whole of it alone)."""
        return t.unbind(0) if self.members else (t,)

    def state_value(self, values: list[float]) -> float | list[float]:
        """A per-member value as the state keeps it: one float alone (as the reference keeps max),
        the list in a group."""
        return values if self.members else values[0]

    @staticmethod
    def member_list(value: float | Sequence[float]) -> list[float]:
        """The members' values of a state value or group["lr"] (one alone)."""
        if isinstance(value, (int, float)):
            return [value]
        return list(value)

    def _normalized_grads(self, params: list[Tensor]) -> list[Tensor]:
        """Madam's g* (jxbz/madam) of each parameter: g / sqrt(bias-corrected EMA of g^2), NaN -> 0,
        clamped to +-g_bound.

        On a parameter's first step it records max = p_scale * RMS(p) per member, the bound the
        weights are clamped to (each member's RMS from its own tensor, the sum alone runs). The
        arithmetic follows the reference expression by expression (in place, in the same order),
        so results match it bit for bit; each expression runs over all the parameters in one
        `torch._foreach_*` call (the same kernels, per tensor) instead of one call per parameter.
        Every member steps at once, so the step count (and the bias correction) is shared.
        Returns fresh tensors the caller may overwrite.
        """
        if not params:
            return []
        corrections = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["max"] = self.state_value([p_scale * (member * member).mean().sqrt().item() for
                                                 p_scale, member in zip(self.p_scales, self.members_of(p),
                                                                        strict=True)])
                state["step"] = 0
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            corrections.append(1 - MADAM_BETA ** state["step"])
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            raise ValueError("Madam's g* is taken of parameters that have gradients")
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]  # v <- beta v + (1 - beta) g^2
        torch._foreach_mul_(exp_avg_sqs, MADAM_BETA)
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(squares, MADAM_ONE_MINUS_BETA)
        torch._foreach_add_(exp_avg_sqs, squares)
        roots = torch._foreach_div(exp_avg_sqs, corrections)
        torch._foreach_sqrt_(roots)
        g_normed = torch._foreach_div(grads, roots)
        for g in g_normed:
            g.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        bound = self.g_bounds[0]
        if all(g_bound == bound for g_bound in self.g_bounds):
            torch._foreach_clamp_min_(g_normed, -bound)
            torch._foreach_clamp_max_(g_normed, bound)
        else:
            for g in g_normed:
                g.clamp_min_(self.member_values([-b for b in self.g_bounds], g))
                g.clamp_max_(self.member_values(self.g_bounds, g))
        return list(g_normed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lrs = self.member_list(group["lr"])
            for p, g_normed in zip(params, self._normalized_grads(params), strict=True):
                self._update(p, g_normed, lrs)
        return loss

    def _update(self, p: Tensor, g_normed: Tensor, lrs: Sequence[float]) -> None:
        p.mul_(torch.exp(self.member_values([-lr for lr in lrs], p) * g_normed * torch.sign(p)))
        self._clamp(p)

    def _clamp(self, p: Tensor) -> None:
        """p <- clamp(p, -max, max), each member to its own max."""
        bounds = self.state[p]["max"]
        if isinstance(bounds, float):  # one max (a run alone): no per-member values to build
            p.clamp_(-bounds, bounds)
            return
        low, high = self.member_values([-bound for bound in bounds], p), self.member_values(bounds, p)
        if isinstance(low, Tensor) and isinstance(high, Tensor):
            p.clamp_(low, high)
        else:
            p.clamp_(float(low), float(high))


CODE_LIMIT = 2**29
"""Bound on stored log codes and float-path code steps, so that int32 code sums stay exact (a finite
float32 weight's code is at most 150 * gamma in magnitude; zero weights' -inf codes land here)."""

MAX_DYADIC_SHIFT = 30
"""Largest k for which a code step gamma * lr = num / 2^k is rounded in integers (k-bit remainders)."""


def dyadic_code_step(gamma_lr: float, g_max: int, rounding: str) -> tuple[int, int] | None:
    """(num, k) with gamma * lr == num / 2^k exactly, when the integer rounding of
    round(g*) * num / 2^k (|round(g*)| <= g_max) is exact in int32; None: round in float64.

    pseudo_stochastic also needs |round(g*) * num| below 2^(53 - k), the range in which
    `round_shifted` reproduces round_to_integer's rule on the float64 quotient.
    """
    if not math.isfinite(gamma_lr) or rounding.startswith("stochastic("):  # k random bits: float64 path
        return None
    num, den = gamma_lr.as_integer_ratio()
    k = den.bit_length() - 1
    largest = abs(num) * g_max
    if k > MAX_DYADIC_SHIFT or largest >= 2**30:
        return None
    if rounding == "pseudo_stochastic" and largest.bit_length() + k > 53:
        return None
    return num, k


def random_fields(n: int, k: int, device: torch.device,
                  generator: torch.Generator | MemberGenerators | None) -> Tensor:
    """n independent uniform k-bit integers (1 <= k <= 30) cut from `random_bits`' 31-bit draws: each
    draw is split into 4 bytes (k <= 7) or 2 halves (k <= 15) or kept whole, and each piece masked to
    its low k bits (the top piece has 7, 15 or 31 random bits): exactly uniform, fewer draws.
    With `MemberGenerators` of G members, n / G from each member's generator, as each draws alone,
    shaped (G, n / G)."""
    dtype, per_draw = (torch.uint8, 4) if k <= 7 else (torch.int16, 2) if k <= 15 else (torch.int32, 1)
    members = len(generator) if isinstance(generator, MemberGenerators) else 1
    each = n // members
    count = -(-each // per_draw)
    draws = random_bits((members * count,), device, generator)
    fields = draws.view(members, count).view(dtype)[:, :each].bitwise_and_((1 << k) - 1)
    return fields if isinstance(generator, MemberGenerators) else fields[0]


def _generator_list(generator: torch.Generator | MemberGenerators | None, members: int
                    ) -> list[torch.Generator | None]:
    return generator.generators if isinstance(generator, MemberGenerators) else [generator] * members


def round_shifted(s: Tensor, k: int | Sequence[int], rounding: str,
                  generator: torch.Generator | MemberGenerators | None = None) -> Tensor:
    """R(s / 2^k) for int32 s (|s| < 2^30, 0 <= k <= 30), computed in place in s.

    nearest and toward_zero give exactly torch.round (ties to even) and torch.trunc of the quotient.
    stochastic rounds up with probability (s mod 2^k) / 2^k exactly, from k-bit `random_fields`.
    pseudo_stochastic gives what round_to_integer gives on the float64 quotient when |s| < 2^(53-k)
    (see `dyadic_code_step`): its NITI rule splits the significand bits below the point in halves,
    and there those bits are the k remainder bits followed by at least k zeros, so the high half
    is non-zero and the low half zero whenever the quotient is inexact: it rounds away from zero.

    A stacked group's s is (G, n): k may be one shift per member (row), and `MemberGenerators`
    draws each member's bits from its own generator; a member with k = 0 draws none, as alone.
    """
    if not isinstance(k, int):
        shifts = list(k)
        if all(shift == shifts[0] for shift in shifts):
            k = shifts[0]
        else:
            return _round_shifted_members(s, shifts, rounding, generator)
    if k == 0:
        return s
    mask = (1 << k) - 1
    if rounding == "stochastic":  # floor((s + u) / 2^k) = floor(s / 2^k) + [u >= 2^k - s mod 2^k]
        s.add_(random_fields(s.numel(), k, s.device, generator).reshape(s.shape))
    elif rounding == "nearest":  # + 2^(k-1) - 1, + 1 more when the floor is odd: ties go to even
        s.add_((s >> k).bitwise_and_(1).add_(mask >> 1))
    elif rounding == "toward_zero":  # negatives + 2^k - 1: their floor becomes the ceiling
        s.add_((s >> 31).bitwise_and_(mask))
    else:  # pseudo_stochastic: non-negatives + 2^k - 1, away from zero
        s.add_((s >> 31).bitwise_not_().bitwise_and_(mask))
    return s.bitwise_right_shift_(k)


@functools.lru_cache(maxsize=64)
def _shift_columns(shifts: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(G, 1) int32 columns of the members' k, 2^k - 1, the tie bit's weight (1 where k > 0) and
    2^(k-1) - 1 (0 where k = 0), for `_round_shifted_members`; kept, as shifts repeat every step."""
    def column(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32).view(-1, 1).to(device)

    masks = [(1 << shift) - 1 for shift in shifts]
    return (column(list(shifts)), column(masks), column([int(shift > 0) for shift in shifts]),
            column([mask >> 1 for mask in masks]))


@functools.lru_cache(maxsize=64)
def _member_index(members: tuple[int, ...], device: torch.device) -> Tensor:
    """The index of some members' rows of a stacked tensor, on `device`; kept, as the same members are
    picked at every step (a list copied in afresh would make a GPU wait at every step)."""
    return torch.tensor(members, device=device)


def _round_shifted_members(s: Tensor, shifts: list[int], rounding: str,
                           generator: torch.Generator | MemberGenerators | None) -> Tensor:
    """`round_shifted` of a (G, n) s whose members shift by different k: the same integer steps with
    (G, 1) shifts and masks (a member with k = 0: mask 0, no tie bit, shift 0: s as it is).
    Stochastic fields are drawn for the members of each k at once, each from its own generator."""
    k, mask, tie, half = _shift_columns(tuple(shifts), s.device)
    if rounding == "stochastic":
        fields = torch.zeros_like(s)
        sources = _generator_list(generator, len(shifts))
        for shift in sorted(set(shifts) - {0}):
            rows = [g for g, own in enumerate(shifts) if own == shift]
            drawn = random_fields(len(rows) * s.shape[1], shift, s.device,
                                  MemberGenerators([sources[g] for g in rows]))
            if len(rows) == rows[-1] - rows[0] + 1:  # consecutive members
                fields[rows[0]:rows[-1] + 1].copy_(drawn)
            else:
                fields.index_copy_(0, _member_index(tuple(rows), s.device), drawn.to(torch.int32))
        s.add_(fields)
    elif rounding == "nearest":
        s.add_((s >> k).bitwise_and_(tie).add_(half))
    elif rounding == "toward_zero":
        s.add_((s >> 31).bitwise_and_(mask))
    else:
        s.add_((s >> 31).bitwise_not_().bitwise_and_(mask))
    return s.bitwise_right_shift_(k)


@dataclass
class StoredWeight:
    """LNSMadam's view of one LNS-stored weight between steps: valid while the weight's version
    counter is still `version` (the one its own write left) and state["lns_index"] is `index`.

    `table` lists the grid's values in increasing order, -max .. -min, min .. max, then 0 and NaN;
    `index` (int32, flat) is each weight's position in it. Magnitudes grow with the index for
    positive weights and shrink for negative ones, so a log-code step d moves the index by
    sign(p) * d, and [low, high] is the weight's own half (a single position for 0 and NaN). In a
    stacked group `table` holds each member's table (its own scale) one after another, and a
    member's indices point into its own.
    """

    index: Tensor
    low: Tensor
    high: Tensor
    table: Tensor
    version: int


class LNSMadam(Madam):
    """LNS-Madam (Zhao et al. 2022, jiaweizzhao/lns-madam-optimizer): Madam's g* rounded to an
    integer and a base-2 update p <- clamp(p * 2^(-lr * round(g*) * sign(p)), +-max).

    `lns_storage` maps parameters whose weights live in an LNS format to that format. For those
    the scale is fixed (max / fmt.max: the top code is the Madam bound) and the update moves the
    log code e (|p| = scale * 2^(e/gamma)) by R(-gamma * lr * round(g*) * sign(p)) whole codes,
    R being `update_rounding` (exact when gamma * lr * round(g*) is an integer), clamped to the
    grid's nonzero codes: weights stay on the grid, never change sign and never reach zero.
    `switch` turns that off (fp32 warm-up), and then the reference update applies to them too.

    The codes are kept between steps (`StoredWeight`, state["lns_index"]) and recomputed from
    the weight, exactly, whenever something else wrote it. R is odd (stochastic: in distribution),
    so the index moves by R(-gamma * lr * round(g*)) whatever the sign. When gamma * lr is a dyadic
    num / 2^k that rounding is done in integers (`round_shifted`), else in float64
    (`round_to_integer`). Either way nearest, toward_zero and pseudo_stochastic give the results of
    recomputing the codes by log2 and rounding the float64 step at every step, bit for bit; so does
    stochastic in float64, while integer stochastic rounding draws its own bits.

    In a stacked group (`members`, `generator` a `MemberGenerators`) each member has its own scale
    and table, its own code step (integer or float64 by its lr) and its own draws.
    """

    def __init__(self, params: Iterable[Any], lr: MemberValue = DEFAULT_LR["lns-madam"],
                 p_scale: MemberValue = 3.0, g_bound: MemberValue = 10.0,
                 lns_storage: Mapping[Tensor, NumberFormat] | None = None,
                 update_rounding: str = "stochastic",
                 generator: torch.Generator | MemberGenerators | None = None,
                 switch: QuantSwitch | None = None, members: int = 0) -> None:
        self.lns_storage: dict[Tensor, LNS] = {}
        for p, fmt in (lns_storage or {}).items():
            if not isinstance(fmt, LNS):
                raise InputError(f"LNS-Madam stores weights in LNS formats only, got {fmt.spec!r}")
            self.lns_storage[p] = fmt
        try:
            update_rounding = check_rounding(update_rounding)
        except InputError as error:
            raise InputError(f"LNS-Madam update_rounding: {error}") from None
        self.update_rounding = update_rounding
        self.generator = generator
        self.switch = switch or QuantSwitch()
        self._tables: dict[tuple[Any, ...], tuple[Tensor, list[int]]] = {}
        self._stored: dict[Tensor, StoredWeight] = {}
        self._plans: dict[tuple[int, tuple[float, ...]], list[tuple[int, int] | None]] = {}
        super().__init__(params, lr, p_scale, g_bound, members)
        self._g_maxes = [math.ceil(bound) if math.isfinite(bound) else 2**31  # bound |round(g*)|
                         for bound in self.g_bounds]

    def _values(self, fmt: LNS, scales: Sequence[float], dtype: torch.dtype, device: torch.device
                ) -> tuple[Tensor, list[int]]:
        """StoredWeight.table: per member +-scale * 2^(e/gamma) (e = -E..E, in float64, rounded once),
        0, NaN; and per member how many of its magnitudes underflow to 0 in `dtype`."""
        key = (fmt, tuple(scales), dtype, device)
        cached = self._tables.get(key)
        if cached is None:
            values = fmt.values()
            tables, lost = [], []
            for scale in scales:
                magnitudes = (values[values > 0] * scale).to(dtype)
                ends = magnitudes.new_tensor([0.0, math.nan])
                tables.append(torch.cat([-magnitudes.flip(0), magnitudes, ends]))
                lost.append(int(torch.count_nonzero(magnitudes == 0)))
            cached = self._tables[key] = (torch.cat(tables).to(device), lost)
        return cached

    def _update(self, p: Tensor, g_normed: Tensor, lrs: Sequence[float]) -> None:
        g_normed.round_()
        fmt = self.lns_storage.get(p)
        if fmt is not None and self.switch.enabled:
            self._step_codes(p, g_normed, lrs, fmt)
            return
        # the reference's -lr * round(g*) * sign(p)
        exponent = g_normed.mul_(self.member_values([-lr for lr in lrs], p)).mul_(torch.sign(p))
        p.mul_(self._power_of_two(exponent))
        self._clamp(p)

    def _power_of_two(self, exponent: Tensor) -> Tensor:
        """2^exponent, each member's as `torch.pow(2.0, ...)` gives it alone.

        torch's CPU pow runs its vector kernel over whole blocks of 2 x the vector width and its
        scalar std::pow over the rest, and the two differ in the last bit for some inputs: so which
        elements take which depends on where they sit in the tensor. Alone a member's tail takes
        std::pow; stacked, it would not. Written into a (G, n) view of a (G, n + 1) buffer, the
        stacked tensor cannot be iterated as one run of G * n elements, and torch runs its kernel
        row by row: each member's n elements are split as alone (on one thread, or below
        PARALLEL_GRAIN elements; else member by member, as each splits alone among threads). On
        CUDA every element takes the same scalar function wherever it sits: the group at once.
        """
        members = exponent.shape[0] if self.members else 1
        if members == 1 or exponent.device.type != "cpu":
            return torch.pow(2.0, exponent, out=exponent)
        if torch.get_num_threads() > 1 and exponent.numel() >= PARALLEL_GRAIN:
            for member in exponent:
                torch.pow(2.0, member, out=member)
            return exponent
        each = exponent[0].numel()
        rows = exponent.new_empty(members, each + 1)[:, :each]
        return torch.pow(2.0, exponent.view(members, each), out=rows).view(exponent.shape)

    def _stored_weight(self, p: Tensor, state: dict[str, Any], fmt: LNS) -> StoredWeight:
        """The kept index of p, or a fresh one from p's values when p was written by someone else."""
        stored = self._stored.get(p)
        if stored is not None and stored.index is state.get("lns_index") and stored.version == p._version:
            return stored
        scales = self.member_list(state["lns_scale"])
        table, lost_codes = self._values(fmt, scales, p.dtype, p.device)
        members = len(scales)
        length = table.numel() // members  # each member's table: 2E + 1 magnitudes each sign, 0, NaN
        size = (length - 2) // 2
        top = (size - 1) // 2
        scale = self.member_values(scales, p, torch.float64)
        codes = torch.round(torch.log2(p.abs().double() / scale) * fmt.gamma)
        codes = codes.nan_to_num_(nan=0.0).clamp_(-CODE_LIMIT, CODE_LIMIT).to(torch.int32)
        codes = codes.reshape(members, -1)
        flat = p.detach().reshape(members, -1)
        positive, negative = flat > 0, flat < 0
        pinned = torch.isnan(flat).to(torch.int32).add_(2 * size)  # 0 and NaN stay as they are
        # Codes whose scaled value underflows to 0 in p's dtype (grids out to 2^+-128, such as
        # lns(16,gamma=128), scaled to the weights) are not used: weights saturate at the smallest
        # non-zero one, as they saturate at the grid's smallest magnitude.
        lost = self.member_values(lost_codes, flat, torch.int32)
        index = torch.where(positive, codes + (size + top),
                            torch.where(negative, (size - 1 - top) - codes, pinned))
        low = torch.where(positive, size + lost, torch.where(negative, 0, pinned))
        high = torch.where(positive, 2 * size - 1, torch.where(negative, size - 1 - lost, pinned))
        if members > 1:  # member g's indices point into its table, the g-th
            offsets = self.member_values([g * length for g in range(members)], flat, torch.int32)
            index, low, high = index.add_(offsets), low.add_(offsets), high.add_(offsets)
        index, low, high = index.reshape(-1), low.reshape(-1), high.reshape(-1)
        stored = StoredWeight(index, low, high, table, p._version)
        state["lns_index"] = index
        self._stored[p] = stored
        return stored

    def _step_codes(self, p: Tensor, g_rounded: Tensor, lrs: Sequence[float], fmt: LNS) -> None:
        state = self.state[p]
        if "lns_scale" not in state:
            state["lns_scale"] = self.state_value([bound / fmt.max if bound > 0 else 1.0
                                                   for bound in self.member_list(state["max"])])
        stored = self._stored_weight(p, state, fmt)
        members = len(lrs)
        steps = stored.index.view(members, -1)
        rows = g_rounded.reshape(members, -1)
        gamma = fmt.gamma
        plans = self._plans.get((gamma, tuple(lrs)))
        if plans is None:  # each member's (num, k), or None: its step rounds in float64
            plans = self._plans[(gamma, tuple(lrs))] = [
                dyadic_code_step(gamma * lr, g_max, self.update_rounding)
                for lr, g_max in zip(lrs, self._g_maxes, strict=True)]
        whole = [g for g, plan in enumerate(plans) if plan is not None]  # integer code steps
        for part in (whole, [g for g, plan in enumerate(plans) if plan is None]):
            if not part:
                continue
            every = len(part) == members
            selected = rows if every else rows.index_select(0, _member_index(tuple(part), rows.device))
            generator = self._generators(part)
            if part is whole:
                shifted = selected.to(torch.int32)
                dyadic = [plan for plan in plans if plan is not None]
                nums = [num for num, _ in dyadic]
                if any(num != 1 for num in nums):
                    shifted.mul_(self.member_values(nums, shifted))
                delta = round_shifted(shifted, [k for _, k in dyadic], self.update_rounding, generator)
                sign = -1
            else:
                factors = self.member_values([-gamma * lrs[g] for g in part], selected, torch.float64)
                delta = round_to_integer(factors * selected.double(), self.update_rounding, generator,
                                         in_place=True)
                delta = delta.clamp_(-CODE_LIMIT, CODE_LIMIT).to(torch.int32)
                sign = 1
            if every and sign > 0:
                steps.add_(delta)
            elif every:
                steps.sub_(delta)
            else:
                steps.index_add_(0, _member_index(tuple(part), steps.device), delta, alpha=sign)
        index = stored.index
        index.clamp_(stored.low, stored.high)
        if p.is_contiguous():
            torch.index_select(stored.table, 0, index, out=p.view(-1))
        else:
            p.copy_(stored.table.index_select(0, index).view(p.shape))
        stored.version = p._version

    def _generators(self, part: list[int]) -> torch.Generator | MemberGenerators | None:
        """The generator of the members in `part` (a run alone: its own)."""
        if not self.members:
            return self.generator
        sources = _generator_list(self.generator, self.members)
        return MemberGenerators([sources[g] for g in part])


class StepQuantizer:
    """Post-step hook: stored weights -> policy.master_weights, optimizer state -> policy.optimizer_state."""

    def __init__(self, stored: list[tuple[Tensor, TensorQuant]], state: TensorQuant,
                 switch: QuantSwitch, generator: torch.Generator | None) -> None:
        self.stored = [(p, quant) for p, quant in stored if quant.enabled]
        self.state = state
        self.switch = switch
        self.generator = generator

    @torch.no_grad()
    def quantize_weights(self) -> None:
        for p, storage in self.stored:
            p.copy_(storage(p, self.generator))

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args: Any = None, kwargs: Any = None) -> None:
        if not self.switch.enabled:
            return
        self.quantize_weights()
        if self.state.enabled:
            for p_state in optimizer.state.values():
                for key in STATE_KEYS:
                    value = p_state.get(key)
                    if isinstance(value, Tensor) and value.is_floating_point():
                        value.copy_(self.state(value, self.generator))


def check_optimizer(name: str, policy: QuantPolicy, weight_decay: float) -> None:
    """What the optimizer `name` cannot do with these formats and this weight decay (InputError);
    `check_config` runs it before any data is loaded."""
    if name == "niti":
        raise InputError("optimizer 'niti' trains integer networks through dse.train.niti, "
                         "not make_optimizer")
    if name not in OPTIMIZER_NAMES:
        raise InputError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")
    if name in MADAM_OPTIMIZERS and weight_decay != 0:
        raise InputError(f"optimizer {name!r} has no weight decay (multiplicative updates), "
                         f"got weight_decay={weight_decay}")
    storage = policy.master_weights.format
    if name == "lns-madam" and storage is not None and storage.family != "lns":
        raise InputError(lns_madam_copy_error(policy.master_copy, storage.spec))


def lns_madam_copy_error(master_weights: bool | str, spec: str) -> str:
    """Why LNS-Madam cannot keep its weights in `spec` (a non-LNS format)."""
    where = f"master_weights {master_weights!r}" if isinstance(master_weights, str) else \
        f"weights {spec!r} (stored in their format: master_weights off)"
    return (f"optimizer 'lns-madam' moves each weight by whole steps of its log code, so it keeps the "
            f"weights in an LNS format (or an fp32 copy); got {where}")


def plain_optimizer(name: str, params: Sequence[Tensor] | Sequence[dict[str, Any]], lr: float,
                    momentum: float, weight_decay: float, foreach: bool | None = None
                    ) -> torch.optim.Optimizer:
    """torch's SGD, Adam or AdamW over `params` (tensors, or param groups of `plain_param_group`, each
    with its own hyperparameters), without the post-step quantization (`quantized_optimizer` adds it;
    grouped training builds one group per run of members with equal hyperparameters; `foreach` None is
    torch's choice for the device, True (grouped SGD) each update operation called once over a group's
    tensors, on the CPU a loop in C++ over the same per-tensor kernels). Madam and LNS-Madam, which
    take their own hyperparameters: `madam_optimizer`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)


def plain_param_group(name: str, params: Sequence[Tensor], lr: float, momentum: float, weight_decay: float
                      ) -> dict[str, Any]:
    """One param group of `plain_optimizer` `name`: `params` with the hyperparameters it takes."""
    group: dict[str, Any] = {"params": list(params), "lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        group["momentum"] = momentum
    return group


def madam_optimizer(name: str, params: Sequence[Tensor], lr: MemberValue, p_scale: MemberValue,
                    g_bound: MemberValue, lns_storage: Mapping[Tensor, NumberFormat], update_rounding: str,
                    generator: torch.Generator | MemberGenerators | None, switch: QuantSwitch,
                    members: int = 0) -> Madam:
    """Madam or LNS-Madam over `params`: a run's own, or (`members` G > 0) a stacked group's, the
    hyperparameters one per member and `generator` the members' `MemberGenerators`."""
    if name == "madam":
        return Madam(params, lr=lr, p_scale=p_scale, g_bound=g_bound, members=members)
    return LNSMadam(params, lr=lr, p_scale=p_scale, g_bound=g_bound, lns_storage=lns_storage,
                    update_rounding=update_rounding, generator=generator, switch=switch, members=members)


class QuantizedOptimizer(NamedTuple):
    """An optimizer and its post-step hook (already registered on it)."""

    optimizer: torch.optim.Optimizer
    step_quantizer: StepQuantizer
    """Rounds the stored weights and the state after each step; its `quantize_weights` moves fp32
    warm-up weights into their format when quantization is switched on."""


def make_optimizer(name: str, model: nn.Module, policy: QuantPolicy, lr: float | None, momentum: float,
                   weight_decay: float, generator: torch.Generator | None = None, p_scale: float = 3.0,
                   g_bound: float = 10.0) -> torch.optim.Optimizer:
    """The named optimizer over all of the model's parameters, with the policy's state and storage
    re-quantization after every step (`quantized_optimizer`'s optimizer)."""
    return quantized_optimizer(name, model, policy, lr, momentum, weight_decay, generator, p_scale,
                               g_bound).optimizer


def quantized_optimizer(name: str, model: nn.Module, policy: QuantPolicy, lr: float | None, momentum: float,
                        weight_decay: float, generator: torch.Generator | None = None, p_scale: float = 3.0,
                        g_bound: float = 10.0) -> QuantizedOptimizer:
    """The named optimizer over all of the model's parameters, with the policy's state and storage
    re-quantization after every step (the hook, returned beside it).

    lr None takes DEFAULT_LR[name]. momentum applies to sgd only (Adam keeps betas (0.9, 0.999));
    madam and lns-madam take no weight decay; p_scale and g_bound are theirs. `generator` feeds the
    stochastic rounding of stored weights and state (None: torch's global generator). When the
    weights live in a format (policy.master_weights: a master copy's, or the weight format itself) the
    quantized layers' weights are rounded into it right away, unless quantization is switched off.
    """
    check_optimizer(name, policy, weight_decay)
    lr = DEFAULT_LR[name] if lr is None else lr
    switch = quant_switch(model) or QuantSwitch()
    params = list(model.parameters())
    stored = stored_weights(model)
    lns: dict[Tensor, NumberFormat] = {}
    if name == "lns-madam":
        lns = {p: fmt for p, quant in stored if (fmt := quant.format) is not None}  # each layer's own
        other = next((fmt for fmt in lns.values() if fmt.family != "lns"), None)
        if other is not None:
            raise InputError(f"optimizer 'lns-madam' needs LNS weights (or fp32) in every layer when weights "
                             f"live in a format, got {other.spec!r}")
    if name in MADAM_OPTIMIZERS:
        optimizer: torch.optim.Optimizer = madam_optimizer(name, params, lr, p_scale, g_bound, lns,
                                                           policy.master_weights.rounding, generator, switch)
    else:
        optimizer = plain_optimizer(name, params, lr, momentum, weight_decay)
    if name == "lns-madam":
        stored = []  # LNSMadam keeps them on the grid itself
    hook = StepQuantizer(stored, policy.optimizer_state, switch, generator)
    optimizer.register_step_post_hook(hook)
    if switch.enabled:
        hook.quantize_weights()
    return QuantizedOptimizer(optimizer, hook)
