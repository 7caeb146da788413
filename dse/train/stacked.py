"""A group of networks of one architecture as one stacked network: every weight carries a leading
member axis, and each layer runs its GEMMs for all members in one batched call.

For a stacked Linear layer with weights W (G, out, in) and inputs x (G, B, in) the three GEMMs of
dse/train/layers.py become, per member g,

    forward          y[g]  = Qa(x)[g] @ Qw(W)[g]^T + b[g]           (torch.baddbmm)
    backward-data    dx[g] = Qe(dy)[g] @ Qw(W)[g]                    (torch.bmm)
    backward-weight  dW[g] = Qwg(Qe(dy)[g]^T @ Qa(x)[g])             (torch.bmm)   db[g] = sum Qe(dy)[g]

where each quantizer is the member's own (`TensorQuant.members`: a scale per member, stochastic
rounding from each member's generator). On the CPU a batched GEMM runs the same GEMM kernel per
member as the unbatched call, so every member computes bit for bit what it computes alone
(tests/train/test_train_grouped.py checks it); a device whose batched GEMM sums in another order would
differ in the last bits, as two GEMM libraries do.

Only networks made of Linear, ReLU, Flatten and reshape stages stack yet (`stack_reason` says why
another does not); grouped training trains those one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dse.formats.base import MemberGenerators
from dse.train import accumulation
from dse.train.accumulation import Accumulator
from dse.train.layers import LayerPolicies, LayerQuant, QuantGemm, Quantizer, QuantSwitch
from dse.train.policy import QuantPolicy, TensorQuant

STACKABLE_STAGES: tuple[str, ...] = ("Linear", "ReLU", "Flatten", "_Reshape")
"""Module types a stacked network is built from (their class names)."""


def stack_reason(model: nn.Module, policy: QuantPolicy | None = None) -> str | None:
    """Why `model` cannot be stacked (None: it can): only nn.Sequential chains of STACKABLE_STAGES.
    `policy` (the trial's quantization) stacks whatever it says."""
    if type(model) is not nn.Sequential:
        return f"{type(model).__name__} is not a chain of layers (nn.Sequential)"
    for module in model:
        name = type(module).__name__
        if name not in STACKABLE_STAGES:
            return f"its {name} layers do not stack yet (only Linear, ReLU, Flatten and reshape stages)"
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            return "a Flatten over other dimensions than all but the batch"
    return None


def layer_policies(model: nn.Module, policy: QuantPolicy) -> dict[int, QuantPolicy]:
    """Each GEMM module's policy (by id), as `quantize_model` resolves it: per-layer rules and
    full-precision layers over the trial's policy."""
    from dse.train.functional import find_gemms

    sites = [site for site in find_gemms(model, None).sites if site.module is not None]
    policies = LayerPolicies(policy, [site.layer for site in sites])
    return {id(site.module): policies.of(site.layer) for site in sites}


class StackedLinearOp:
    """The GEMMs of the module docstring for all members at once: x (G, B, in), w (G, out, in).

    An op of the shared `QuantGemm` (dse/train/layers.py), which quantizes the operands around it.
    With an accumulator each GEMM is folded chunk by chunk over the same reduction indices as a
    member's Linear alone (dse/train/accumulation.py): in_features forward, out_features
    backward-data, the batch rows backward-weight; the chunks are batched matmuls.
    """

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        dx = torch.bmm(dy, weight) if need_data else None
        dw = torch.bmm(dy.transpose(1, 2), x) if need_weight else None
        return dx, dw

    def bias_grad(self, dy: Tensor) -> Tensor:
        return dy.sum(1)

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor:
        y = accumulation.matmul_forward(x, weight.transpose(1, 2), accumulator)
        return y if bias is None else y + bias.unsqueeze(1)

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]:
        dx = accumulation.matmul_forward(dy, weight, accumulator) if need_data else None
        dw = accumulation.matmul_backward_b(dy, x, accumulator) if need_weight else None
        return dx, dw


_STACKED_LINEAR = StackedLinearOp()
_FP32_GEMM = LayerQuant(_STACKED_LINEAR, None, None, None, None, QuantSwitch())
"""A stacked Linear's GEMMs in fp32. Not torch's autograd of baddbmm: that gives the weight gradient
as a transposed view, which autograd copies into the contiguous .grad on every step (that copy was 14 % of
the profiled fp32 step of a group of 16)."""


class StackedLinear(nn.Module):
    """G Linear layers of one shape: weight (G, out, in), bias (G, out); inputs (G, B, in).

    `gemm_quant` None keeps the layer in fp32, as does a switched-off `QuantSwitch`: the same batched
    GEMMs with no quantizers (`_FP32_GEMM`), which compute what nn.Linear computes per member.
    """

    def __init__(self, layers: Sequence[nn.Linear], gemm_quant: LayerQuant | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        has_bias = layers[0].bias is not None
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])) if has_bias else None
        self.gemm_quant = gemm_quant

    def forward(self, x: Tensor) -> Tensor:
        quant = self.gemm_quant
        if quant is None or not quant.switch.enabled:
            quant = _FP32_GEMM
        return QuantGemm.apply(x, self.weight, self.bias, quant)


class StackedReshape(nn.Module):
    """Each sample viewed as `shape` (Flatten: shape (-1,)), the member and batch axes kept."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], *self.shape)


def _members(quant: TensorQuant, generators: MemberGenerators) -> Quantizer | None:
    if not quant.enabled:
        return None
    return lambda x: quant.members(x, generators)


def stack_models(models: Sequence[nn.Module], policy: QuantPolicy, switch: QuantSwitch,
                 generators: MemberGenerators) -> nn.Sequential:
    """One stacked network from G networks of one architecture (each member's own initial weights),
    quantized as `quantize_model` quantizes each of them under `policy` (full-precision layers
    included), with each member's stochastic rounding drawn from its own generator."""
    first = models[0]
    reason = stack_reason(first, policy)
    if reason is not None:
        raise ValueError(f"cannot stack this model: {reason}")
    chains = [model for model in models if isinstance(model, nn.Sequential)]
    assert len(chains) == len(models)  # stack_reason: one architecture, an nn.Sequential
    policies = layer_policies(first, policy)
    stages: list[nn.Module] = []
    for index, module in enumerate(chains[0]):
        if isinstance(module, nn.Linear):
            quant = None
            own = policies[id(module)]
            if own.quantizes_gemms:
                accumulate = _members(own.accumulation, generators)
                accumulator = None if accumulate is None else Accumulator(accumulate, own.accumulation_chunk)
                quant = LayerQuant(_STACKED_LINEAR, activations=_members(own.activations, generators),
                                   weights=_members(own.weights, generators),
                                   gradients=_members(own.gradients, generators),
                                   weight_grads=_members(own.weight_grads, generators), switch=switch,
                                   accumulator=accumulator,
                                   master_weights=own.master_weights if own.master_weights.enabled else None)
            linears = [layer for chain in chains if isinstance(layer := chain[index], nn.Linear)]
            stages.append(StackedLinear(linears, quant))
        elif isinstance(module, nn.ReLU):
            stages.append(nn.ReLU())
        elif isinstance(module, nn.Flatten):
            stages.append(StackedReshape((-1,)))
        else:
            stages.append(StackedReshape(tuple(vars(module)["shape"])))  # a _Reshape's plain attribute
    return nn.Sequential(*stages)


def stored_weights(model: nn.Sequential) -> list[tuple[Tensor, TensorQuant]]:
    """The stacked weights that live in a format between steps, with it, in layer order (what
    `dse.train.layers.stored_weights` gives for each member alone)."""
    return [(m.weight, m.gemm_quant.master_weights) for m in model if isinstance(m, StackedLinear)
            and m.gemm_quant is not None and m.gemm_quant.master_weights is not None]
