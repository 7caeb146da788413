"""Optimizers for quantized training: torch's SGD/Adam/AdamW, Madam and LNS-Madam, plus the
re-quantization of stored weights and optimizer state after every step.

`make_optimizer` builds one from a name and a `QuantPolicy`. After each `step()` a post-step hook
(`StepQuantizer`) rounds the weights of the model's quantized layers into `policy.storage` (when
there is no fp32 master copy) and the optimizer's state tensors into `policy.state`. LNS-Madam with
weights stored in an LNS format moves each weight's log code by whole steps itself (see `LNSMadam`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dse.errors import InputError
from dse.formats import NumberFormat, round_to_integer
from dse.train.layers import QuantSwitch, quant_switch, quantized_layers
from dse.train.policy import QuantPolicy, TensorQuant

OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "adamw", "madam", "lns-madam")

DEFAULT_LR: dict[str, float] = {
    "sgd": 0.05,
    "adam": 1e-3,
    "adamw": 1e-3,
    "madam": 0.01,       # jxbz/madam default
    "lns-madam": 1 / 128,  # jiaweizzhao/lns-madam-optimizer default: one 1/128 step in log2 per unit of g*
}

STATE_KEYS: tuple[str, ...] = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""Per-parameter state tensors that are re-quantized with policy.state (step counters are not)."""

MADAM_BETA = 0.999
MADAM_ONE_MINUS_BETA = 0.001  # written out: 1 - 0.999 is not 0.001 in floating point


def _normalized_grad(optimizer: torch.optim.Optimizer, p: Tensor, g_bound: float) -> Tensor:
    """Madam's g* (jxbz/madam): g / sqrt(bias-corrected EMA of g^2), NaN -> 0, clamped to +-g_bound.

    On the first step it records max = p_scale * RMS(p), the bound the weights are clamped to.
    The arithmetic follows the reference expression by expression, so results match it bit for bit.
    """
    state = optimizer.state[p]
    if len(state) == 0:
        state["max"] = optimizer.p_scale * (p * p).mean().sqrt().item()  # type: ignore[attr-defined]
        state["step"] = 0
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    bias_correction = 1 - MADAM_BETA ** state["step"]
    grad = p.grad
    state["exp_avg_sq"] = MADAM_BETA * state["exp_avg_sq"] + MADAM_ONE_MINUS_BETA * grad**2
    g_normed = grad / (state["exp_avg_sq"] / bias_correction).sqrt()
    g_normed[torch.isnan(g_normed)] = 0
    return g_normed.clamp_(-g_bound, g_bound)


class Madam(torch.optim.Optimizer):
    """Madam (Bernstein et al. 2020, jxbz/madam): p <- clamp(p * exp(-lr * g* * sign(p)), +-max).

    Multiplicative, so a weight never changes sign and zero weights stay zero; max is p_scale
    times the RMS of the weights at the first step.
    """

    def __init__(self, params: Iterable[Any], lr: float = DEFAULT_LR["madam"], p_scale: float = 3.0,
                 g_bound: float = 10.0) -> None:
        self.p_scale = p_scale
        self.g_bound = g_bound
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, _normalized_grad(self, p, self.g_bound), group["lr"])
        return loss

    def _update(self, p: Tensor, g_normed: Tensor, lr: float) -> None:
        p.mul_(torch.exp(-lr * g_normed * torch.sign(p)))
        p.clamp_(-self.state[p]["max"], self.state[p]["max"])


class LNSMadam(Madam):
    """LNS-Madam (Zhao et al. 2022, jiaweizzhao/lns-madam-optimizer): Madam's g* rounded to an
    integer and a base-2 update p <- clamp(p * 2^(-lr * round(g*) * sign(p)), +-max).

    `lns_storage` maps parameters whose weights live in an LNS format to that format. For those
    the scale is fixed (max / fmt.max: the top code is the Madam bound) and the update moves the
    log code e (|p| = scale * 2^(e/gamma)) by R(-gamma * lr * round(g*) * sign(p)) whole codes,
    R being `update_rounding` (exact when gamma * lr * round(g*) is an integer), clamped to the
    grid's nonzero codes: weights stay on the grid, never change sign and never reach zero.
    `switch` turns that off (fp32 warm-up), and then the reference update applies to them too.
    """

    def __init__(self, params: Iterable[Any], lr: float = DEFAULT_LR["lns-madam"], p_scale: float = 3.0,
                 g_bound: float = 10.0, lns_storage: dict[Tensor, NumberFormat] | None = None,
                 update_rounding: str = "stochastic", generator: torch.Generator | None = None,
                 switch: QuantSwitch | None = None) -> None:
        self.lns_storage = dict(lns_storage or {})
        self.update_rounding = update_rounding
        self.generator = generator
        self.switch = switch or QuantSwitch()
        self._code_tables: dict[tuple[NumberFormat, torch.device], Tensor] = {}
        for fmt in self.lns_storage.values():
            if fmt.family != "lns":
                raise InputError(f"LNS-Madam stores weights in LNS formats only, got {fmt.spec!r}")
        super().__init__(params, lr, p_scale, g_bound)

    def _magnitudes(self, fmt: NumberFormat, device: torch.device) -> Tensor:
        """The grid's nonzero magnitudes 2^(e/gamma), e = -E..E, in float64 (index e + E)."""
        table = self._code_tables.get((fmt, device))
        if table is None:
            values = fmt.values()
            table = values[values > 0].to(device)
            self._code_tables[(fmt, device)] = table
        return table

    def _update(self, p: Tensor, g_normed: Tensor, lr: float) -> None:
        g_normed.round_()
        fmt = self.lns_storage.get(p)
        if fmt is not None and self.switch.enabled:
            self._step_codes(p, g_normed, lr, fmt)
        else:
            p.mul_(2.0 ** (-lr * g_normed * torch.sign(p)))
            p.clamp_(-self.state[p]["max"], self.state[p]["max"])

    def _step_codes(self, p: Tensor, g_rounded: Tensor, lr: float, fmt: NumberFormat) -> None:
        state = self.state[p]
        if "lns_scale" not in state:
            state["lns_scale"] = state["max"] / fmt.max if state["max"] > 0 else 1.0
        scale = state["lns_scale"]
        table = self._magnitudes(fmt, p.device)
        top = (table.numel() - 1) // 2
        gamma = fmt.gamma  # type: ignore[attr-defined]
        sign = torch.sign(p)
        codes = torch.round(torch.log2(p.abs().double() / scale) * gamma)  # exact on the grid
        codes.nan_to_num_(nan=0.0)  # NaN weights (a diverged run) stay NaN, below
        steps = round_to_integer((-gamma * lr) * g_rounded.double() * sign, self.update_rounding,
                                 self.generator)
        index = (codes + steps).clamp_(-top, top).add_(top).long()
        stepped = table.index_select(0, index.reshape(-1)).reshape(p.shape).mul_(scale).mul_(sign)
        p.copy_(torch.where(torch.isnan(p), p, stepped))


class StepQuantizer:
    """Post-step hook: stored weights -> policy.storage, optimizer state -> policy.state."""

    def __init__(self, storage: TensorQuant, storage_params: list[Tensor], state: TensorQuant,
                 switch: QuantSwitch, generator: torch.Generator | None) -> None:
        self.storage = storage
        self.storage_params = storage_params if storage.enabled else []
        self.state = state
        self.switch = switch
        self.generator = generator

    @torch.no_grad()
    def quantize_weights(self) -> None:
        for p in self.storage_params:
            p.copy_(self.storage(p, self.generator))

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


def _check(name: str, policy: QuantPolicy, weight_decay: float) -> None:
    if name == "niti":
        raise InputError("optimizer 'niti' trains integer networks through dse.train.niti, "
                         "not make_optimizer")
    if name not in OPTIMIZER_NAMES:
        raise InputError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")
    if name in ("madam", "lns-madam") and weight_decay != 0:
        raise InputError(f"optimizer {name!r} has no weight decay (multiplicative updates), "
                         f"got weight_decay={weight_decay}")
    storage = policy.storage.format
    if name == "lns-madam" and not policy.master_weights and storage is not None and storage.family != "lns":
        raise InputError(f"optimizer 'lns-madam' needs LNS weights (or fp32) when weights are stored in "
                         f"their format (master_weights off), got weights {storage.spec!r}")


def make_optimizer(name: str, model: nn.Module, policy: QuantPolicy, lr: float | None, momentum: float,
                   weight_decay: float, generator: torch.Generator | None = None) -> torch.optim.Optimizer:
    """The named optimizer over all of the model's parameters, with the policy's state and storage
    re-quantization after every step.

    lr None takes DEFAULT_LR[name]. momentum applies to sgd only (Adam keeps betas (0.9, 0.999));
    madam and lns-madam take no weight decay. `generator` feeds the stochastic rounding of stored
    weights and state (None: torch's global generator). With master_weights off the quantized
    layers' weights are rounded into storage right away, unless quantization is switched off.
    """
    _check(name, policy, weight_decay)
    lr = DEFAULT_LR[name] if lr is None else lr
    switch = quant_switch(model) or QuantSwitch()
    params = list(model.parameters())
    stored = [m.weight for m in quantized_layers(model) if isinstance(getattr(m, "weight", None), Tensor)]
    stored = stored if not policy.master_weights and policy.storage.enabled else []
    optimizer: torch.optim.Optimizer
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif name == "madam":
        optimizer = Madam(params, lr=lr)
    else:
        lns = {p: policy.storage.format for p in stored} if policy.storage.format is not None else {}
        optimizer = LNSMadam(params, lr=lr, lns_storage=lns, update_rounding=policy.storage.rounding,
                             generator=generator, switch=switch)
        stored = []  # LNSMadam keeps them on the grid itself
    hook = StepQuantizer(policy.storage, stored, policy.state, switch, generator)
    optimizer.register_step_post_hook(hook)
    optimizer.step_quantizer = hook  # type: ignore[attr-defined]
    if switch.enabled:
        hook.quantize_weights()
    return optimizer
