"""NITI stacked over the members of a group (grouped training, dse/train/grouped.py).

G NITI networks of one architecture run as one: each weight (G, out, in) carries a leading member
axis, and the members' batches travel through the network's own forward folded into one batch
(member g's samples are rows g*B .. (g+1)*B-1), so ReLU, pooling and reshapes run once for the
group as they run for each member alone. The NITI layers take the folded batch apart, (G, B, ...),
and every decision the reference takes per tensor is taken per member: the input's TiFloatToInt8
exponent, RangeEstimate and the RoundShift back to int8 after each GEMM, the exponents that travel
forward and back, the mu-bit update (grad_calc with each member's mu), and the cross-entropy's
StoShift draws (each member's own generator). A stacked tensor's exponent is a tuple of G ints
(`Exponent`); the powers 2^e are built from Python floats, so every scaling is the exact one a
member applies alone.

The GEMMs are integer sums below 2^24 (float32) or 2^53 (float64), exact in any order, so a
batched GEMM gives each member exactly its integers alone (convolutions run member by member on
their slices of the folded batch): a member of a group trains bit for bit as `dse train` trains it
(tests/train/test_train_grouped_methods.py). Every layer NITI converts stacks: Linear (batched
GEMMs over each member's rows, sequences included), Conv, Embedding (each member's rows of its own
table, its gradient one exact scatter-add) and attention's Matmul (one batched integer matmul of
two activations, both errors shifted back per member).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dse.formats.base import MemberGenerators, host_abs_max
from dse.train.niti.exponents import (
    _EXACT_SCALING,
    NitiTensor,
    _ErrorSlot,
    _exact_dtype,
    _float_dtype,
    _mantissa_bound,
    _negated,
    _plain,
    _pow2,
    _tag,
    _value,
)
from dse.train.niti.layers import (
    NitiConv,
    NitiEmbedding,
    NitiLinear,
    NitiMatmul,
    NitiWeight,
    matmul_error,
    matmul_product,
)
from dse.train.niti.optim import NitiCrossEntropy, _CrossEntropyFunction, step_weight_
from dse.train.niti.ti_torch import _ceil_log2, int_clip, psto_shift

Exponents = tuple[int, ...]
"""One exponent per member."""


# --- per-member versions of the per-tensor decisions ---------------------------------------------

def _member_peaks(t: Tensor) -> list[float]:
    """max|t[g]| per member, on the host (one read for the group): max(-min, max), two reading
    passes instead of |t| written out and read again (0.66 against 1.50 ms for 8 members of the
    transformer's FFN activations, 1.3 M floats; torch.aminmax along a dim takes 4.2 ms)."""
    rows = t.detach().reshape(t.shape[0], -1)
    low, high = rows.amin(1).tolist(), rows.amax(1).tolist()
    return [max(-lo, hi) for lo, hi in zip(low, high, strict=True)]


def range_estimates(t: Tensor) -> Exponents:
    """RangeEstimate of each member of an integer-valued stacked tensor (0 for an all-zero member)."""
    return tuple((int(peak) - 1).bit_length() if peak > 0 else 0 for peak in _member_peaks(t))


def float_to_int_members(x: Tensor, bitwidth: int) -> tuple[Tensor, Exponents]:
    """TiFloatToInt8 of each member (`_float_to_int`): its own peak and exponent, the mantissa float32."""
    values = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if not values.is_floating_point():
        values = values.double()
    exps = tuple(_ceil_log2(peak) - bitwidth if peak > 0 else 0 for peak in _member_peaks(values))
    if values.dtype != torch.float32 or max(map(abs, exps)) > _EXACT_SCALING:
        values = values.double()
    mantissa = torch.round(values * _pow2(_negated(exps), values, values.dtype))
    return mantissa.clamp(-(2**bitwidth), 2**bitwidth - 1).to(torch.float32), exps


def mantissa_of_members(values: Tensor, exps: Exponents | None, bitwidth: int) -> tuple[Tensor, Exponents]:
    """`_mantissa_of` per member: a member's tagged exponent where its values sit on that grid (and
    the exponent is in float32's exact range), else the member's own TiFloatToInt8."""
    values = _plain(values).detach()
    if exps is None or values.dtype != torch.float32:
        return float_to_int_members(values, bitwidth)
    usable = [abs(e) <= _EXACT_SCALING for e in exps]
    mantissa = values * _pow2(_negated(tuple(e if ok else 0 for e, ok in zip(exps, usable, strict=True))),
                              values, values.dtype)
    if all(usable) and torch.equal(mantissa, torch.round(mantissa)) and host_abs_max(mantissa) <= 2**bitwidth:
        return mantissa, exps  # every member on its grid (the usual case): two passes, as alone
    flat = mantissa.reshape(len(exps), -1)
    grid = ((flat == flat.round()).all(1) & (flat.abs().amax(1) <= 2**bitwidth)).tolist()
    on_grid = [ok and fits for ok, fits in zip(usable, grid, strict=True)]
    fresh, fresh_exps = float_to_int_members(values, bitwidth)
    keep = torch.tensor(on_grid, device=values.device).view(-1, *[1] * (values.dim() - 1))
    return (torch.where(keep, mantissa, fresh),
            tuple(e if ok else f for e, f, ok in zip(exps, fresh_exps, on_grid, strict=True)))


def act_calc_members(acc: Tensor, bitwidth: int) -> tuple[Tensor, Exponents]:
    """act_calc of each member: RoundShift by its own RangeEstimate - bitwidth, or a clip where that is
    not positive (RoundShift's float form with a shift of 0 is that clip, bit for bit)."""
    shifts = tuple(max(r - bitwidth, 0) for r in range_estimates(acc))
    limit = 2**bitwidth - 1
    rounded = acc.abs().mul_(_pow2(_negated(shifts), acc, acc.dtype)).add_(0.5).floor_()
    return rounded.copysign_(acc).clamp_(-limit, limit), shifts


def grad_calc_members(g32: Tensor, mus: Sequence[int], bitwidth: int) -> Tensor:
    """grad_calc of each member with its own mu: zeros where RangeEstimate is 0, PstoShift by b - mu
    where that is at least 1, the clipped accumulator otherwise (PstoShift by 0)."""
    g32 = g32.to(torch.int64)
    ranges = range_estimates(g32)
    shifts = torch.tensor([max(b - mu, 0) for b, mu in zip(ranges, mus, strict=True)], device=g32.device)
    update = psto_shift(g32, shifts.view(-1, *[1] * (g32.dim() - 1)), bitwidth)
    if min(ranges) == 0:
        nonzero = torch.tensor([b > 0 for b in ranges], device=g32.device)
        update = update * nonzero.view(-1, *[1] * (g32.dim() - 1))
    return update


def _members_of(weight: NitiWeight) -> Exponents:
    """A stacked weight's exponents, one per member."""
    assert isinstance(weight.exp, tuple), "a NITI weight of one network in a stacked layer"
    return weight.exp


def _add(*exps: Exponents) -> Exponents:
    return tuple(map(sum, zip(*exps, strict=True)))


MemberActivation = tuple[Tensor, Exponents, "_ErrorSlot | None"]
"""A stacked NITI layer's input: the members' mantissas (G, B, ...), their exponents and the slot its
producer reads the error's exponents from."""


def member_activation(x: Tensor, members: int, bitwidth: int) -> MemberActivation:
    """`_activation_of` per member of a folded (G B, ...) tensor, the mantissas (G, B, ...): each
    member's tagged exponent where its values sit on that grid, else its own TiFloatToInt8."""
    tagged = getattr(x, "niti_exp", None) if isinstance(x, NitiTensor) else None
    slot = getattr(x, "niti_slot", None) if isinstance(x, NitiTensor) else None
    m_x, exps = mantissa_of_members(_plain(x).unflatten(0, (members, -1)),
                                    tagged if isinstance(tagged, tuple) else None, bitwidth)
    return m_x, exps, slot


def member_error(grad: Tensor, slot: _ErrorSlot, members: int, bitwidth: int) -> tuple[Tensor, Exponents]:
    """`_error_of` per member of a folded (G B, ...) error: the exponents its one NITI consumer wrote
    back, where its values sit on that grid, else each member's TiFloatToInt8."""
    written = slot.read()
    exps = written if isinstance(written, tuple) else None
    return mantissa_of_members(grad.unflatten(0, (members, -1)), exps, bitwidth)


# --- weights and layers --------------------------------------------------------------------------

class _StackedGemmFunction(torch.autograd.Function):
    """`_GemmFunction` for all members at once: integer GEMMs batched over the member axis, the
    exponents and shifts per member. x and the value are folded (G B, ...), the mantissas (G, B, ...).
    Outputs: the value, the exponents, the error slot."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, layer: _StackedNitiGemm, m_x: Tensor, exps_x: Exponents,
                in_slot: _ErrorSlot | None) -> tuple[Tensor, Exponents, _ErrorSlot]:
        state = layer.niti_weight
        m_w = state.mantissa(torch.float32)
        m_out, shifts = act_calc_members(layer.int_forward(m_x, m_w), state.bitwidth)
        exps_out = _add(exps_x, _members_of(state), shifts)
        out_slot = _ErrorSlot()
        ctx.layer, ctx.m_x, ctx.m_w, ctx.exps_x = layer, m_x, m_w, exps_x
        ctx.in_slot, ctx.out_slot = in_slot, out_slot
        return _value(m_out, exps_out, _float_dtype(x)).flatten(0, 1), exps_out, out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        layer: _StackedNitiGemm = ctx.layer
        state = layer.niti_weight
        m_err, exps_err = member_error(grad_out, ctx.out_slot, len(_members_of(state)), state.bitwidth)
        grad_x = None
        if ctx.needs_input_grad[0]:
            err_out, shifts = act_calc_members(layer.int_input_grad(m_err, ctx.m_w, ctx.m_x), state.bitwidth)
            exps_out = _add(exps_err, _members_of(state), shifts)
            if ctx.in_slot is not None:
                ctx.in_slot.write(exps_out)
            grad_x = _value(err_out, exps_out, grad_out.dtype).flatten(0, 1)
        if not ctx.needs_input_grad[1]:  # a frozen weight (requires_grad=False): no gradient, no update
            return grad_x, None, None, None, None, None
        g32 = layer.int_weight_grad(m_err, ctx.m_x, ctx.m_w).to(torch.int64)
        exps_g = _add(exps_err, ctx.exps_x)
        state.accumulate(g32, exps_g)
        return grad_x, _value(g32, exps_g, state.param.dtype), None, None, None, None


class _StackedNitiGemm(nn.Module):
    """Shared forward of the stacked weight layers (`_NitiGemm` per member)."""

    niti_weight: NitiWeight

    def __init__(self, layers: Sequence[NitiLinear | NitiConv]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]),
                                   requires_grad=layers[0].weight.requires_grad)  # frozen stays frozen
        self.bitwidth = layers[0].bitwidth
        self.niti_weight = NitiWeight(self.weight, tuple(layer.weight_exp for layer in layers), self.bitwidth)

    def forward(self, x: Tensor) -> Tensor:
        """x: the members' batches folded, (G B, ...)."""
        m_x, exps_x, slot = member_activation(x, len(_members_of(self.niti_weight)), self.bitwidth)
        out, exps, out_slot = _StackedGemmFunction.apply(_plain(x), self.weight, self, m_x, exps_x, slot)
        return _tag(out, exps, out_slot)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        raise NotImplementedError

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        raise NotImplementedError

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        raise NotImplementedError

    def _dtype(self, terms: int) -> torch.dtype:
        return _exact_dtype(terms * _mantissa_bound(self.bitwidth))


def _rows(t: Tensor) -> Tensor:
    """(G, B, ..., features) -> (G, rows, features): a member's samples and positions as rows."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class StackedNitiLinear(_StackedNitiGemm):
    """G NitiLinear layers: x (G, B, ..., in) (a sequence's positions are rows, as alone), weight
    (G, out, in), batched integer GEMMs over each member's rows."""

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        dtype = self._dtype(m_w.shape[2])
        return torch.bmm(_rows(m_x).to(dtype), m_w.to(dtype).transpose(1, 2)).view(*m_x.shape[:-1], -1)

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        dtype = self._dtype(m_w.shape[1])
        return torch.bmm(_rows(m_err).to(dtype), m_w.to(dtype)).view(m_x.shape)

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        rows = _rows(m_x)
        dtype = self._dtype(rows.shape[1])
        return torch.bmm(_rows(m_err).to(dtype).transpose(1, 2), rows.to(dtype))


class StackedNitiConv(_StackedNitiGemm):
    """G NitiConv layers: each member's integer convolution on its slice of the folded batch (a
    contiguous (B, C, ...) block, no copies), its three GEMMs as `NitiConv` runs them alone. One
    grouped convolution over the members is exact as well, but its layout needs the operands copied
    to (B, G C, ...) and back: for 8 members of the CNN proxies' layers it took 1.0-1.3x the time
    of the member-by-member loop (forward and both backward GEMMs, one thread, under load)."""

    def __init__(self, layers: Sequence[NitiConv]) -> None:
        super().__init__(layers)
        self.geometry = (layers[0],)  # the member layers' shared geometry (a tuple: not a submodule)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        conv = self.geometry[0]
        return torch.stack([conv.int_forward(x, w) for x, w in zip(m_x, m_w, strict=True)])

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        conv = self.geometry[0]
        return torch.stack([conv.int_input_grad(e, w, x) for e, w, x in zip(m_err, m_w, m_x, strict=True)])

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        conv = self.geometry[0]
        return torch.stack([conv.int_weight_grad(e, x, w) for e, x, w in zip(m_err, m_x, m_w, strict=True)])


class _StackedEmbeddingFunction(torch.autograd.Function):
    """`_EmbeddingFunction` for all members: member g looks its tokens up in its own table (one
    advanced index over (member, token)); the gradient is each member's exact scatter-add of its
    integer error into its own table (one accumulating index_put over the group)."""

    @staticmethod
    def forward(ctx: Any, indices: Tensor, weight: Tensor, layer: StackedNitiEmbedding
                ) -> tuple[Tensor, Exponents, _ErrorSlot]:
        members = weight.shape[0]
        tokens = indices.unflatten(0, (members, -1))
        member = torch.arange(members, device=indices.device).view(-1, *[1] * (tokens.dim() - 1))
        out_slot = _ErrorSlot()
        ctx.layer, ctx.weight, ctx.out_slot = layer, weight, out_slot
        ctx.at = (member.expand_as(tokens), tokens)
        return weight.detach()[member, tokens].flatten(0, 1), _members_of(layer.niti_weight), out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        weight: Tensor = ctx.weight
        layer: StackedNitiEmbedding = ctx.layer
        m_err, exps_err = member_error(grad_out, ctx.out_slot, weight.shape[0], layer.bitwidth)
        g32 = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
        g32.index_put_(ctx.at, m_err.double(), accumulate=True)
        if layer.padding_idx is not None:
            g32[:, layer.padding_idx] = 0
        layer.niti_weight.accumulate(g32.to(torch.int64), exps_err)
        return None, _value(g32, exps_err, weight.dtype), None


class StackedNitiEmbedding(nn.Module):
    """G NitiEmbedding layers: tables (G, num_embeddings, dim), tokens folded (G B, ...)."""

    def __init__(self, layers: Sequence[NitiEmbedding]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]),
                                   requires_grad=layers[0].weight.requires_grad)  # frozen stays frozen
        self.padding_idx, self.bitwidth = layers[0].padding_idx, layers[0].bitwidth
        self.niti_weight = NitiWeight(self.weight, tuple(layer.weight_exp for layer in layers), self.bitwidth)

    def forward(self, indices: Tensor) -> Tensor:
        out, exps, slot = _StackedEmbeddingFunction.apply(indices, self.weight, self)
        return _tag(out, exps, slot)


class _StackedMatmulFunction(torch.autograd.Function):
    """`_MatmulFunction` for all members: a (G B, ..., n, k) @ b (G B, ..., k, m) as one batched
    integer matmul of the members' mantissas (G, B, ...), the RoundShifts and exponents per member."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, bitwidth: int,
                inputs: tuple[MemberActivation, MemberActivation]) -> tuple[Tensor, Exponents, _ErrorSlot]:
        (m_a, exps_a, _), (m_b, exps_b, _) = inputs
        m_out, shifts = act_calc_members(matmul_product(m_a, m_b, bitwidth), bitwidth)
        exps_out = _add(exps_a, exps_b, shifts)
        out_slot = _ErrorSlot()
        ctx.bitwidth, ctx.inputs, ctx.out_slot = bitwidth, inputs, out_slot
        return _value(m_out, exps_out, _float_dtype(a)).flatten(0, 1), exps_out, out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        (m_a, exps_a, slot_a), (m_b, exps_b, slot_b) = ctx.inputs
        members = len(exps_a)
        m_err, exps_err = member_error(grad_out, ctx.out_slot, members, ctx.bitwidth)
        grads: list[Tensor | None] = [None, None]
        operands = ((m_a, exps_b, slot_a, m_b), (m_b, exps_a, slot_b, m_a))
        for index, (mine, other_exps, slot, other) in enumerate(operands):
            if not ctx.needs_input_grad[index]:
                continue
            acc = matmul_error(index, m_err, other, mine.shape, ctx.bitwidth, members)
            err, shifts = act_calc_members(acc, ctx.bitwidth)
            exps_out = _add(exps_err, other_exps, shifts)
            if slot is not None:
                slot.write(exps_out)
            grads[index] = _value(err, exps_out, grad_out.dtype).flatten(0, 1)
        return grads[0], grads[1], None, None


class StackedNitiMatmul(nn.Module):
    """G NitiMatmul layers (attention's a @ b): both operands folded (G B, ...), read per member."""

    def __init__(self, members: int, bitwidth: int) -> None:
        super().__init__()
        self.members, self.bitwidth = members, bitwidth

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        inputs = (member_activation(a, self.members, self.bitwidth),
                  member_activation(b, self.members, self.bitwidth))
        out, exps, slot = _StackedMatmulFunction.apply(_plain(a), _plain(b), self.bitwidth, inputs)
        return _tag(out, exps, slot)


# --- the network, its loss and its update --------------------------------------------------------

def niti_stack_reason(model: nn.Module, example: Tensor | None = None) -> str | None:
    """Why `model` cannot be stacked under NITI (None: it can). NITI converts the GEMM layers (Linear,
    Conv, Embedding, Matmul), and `stack_niti_models` stacks each of them; a GEMM called as a function
    (nn.MultiheadAttention's, or one a forward on `example` calls) stays float under NITI and has no
    stacked NITI form, whatever the other methods' stacking does with it
    (dse/train/stacked.py `functional_reason`). Otherwise what keeps the model from stacking under any
    method (`stack_reason`) applies."""
    from dse.train.stacked import functional_reason, stack_reason

    return functional_reason(model, example) or stack_reason(model, example)


class FoldedNitiNetwork(nn.Module):
    """G NITI networks as one: the first member's network with each NITI layer replaced by the
    members' stacked layer, run on the members' batches folded into one. Input (G, B, ...), output
    (G, B, ...) tagged with the members' exponents."""

    def __init__(self, network: nn.Module, members: int) -> None:
        from dse.train.member_kernels import MemberKernels, may_call_position_dependent
        from dse.train.stacked import SharedStateGuard

        super().__init__()
        self.network, self.members = network, members
        self.member_kernels = (MemberKernels(network, members) if may_call_position_dependent(network)
                               else None)
        """A user's module may call a function whose CPU kernel's last bit depends on where an element
        sits (SiLU, sigmoid, ...) on the float values the next NITI layer re-quantizes: run member by
        member (dse/train/member_kernels.py), as a stacked float network runs it."""
        self.__dict__["shared_state"] = SharedStateGuard(network, self.member_kernels)
        """A user's module run once for all members that keeps state of its batch drops the group, as
        in a stacked float network (`StackedModel`)."""

    def forward(self, x: Tensor) -> Tensor:
        with self.__dict__["shared_state"].watching():
            if self.member_kernels is None:
                return self.network(x.flatten(0, 1)).unflatten(0, (self.members, -1))
            with self.member_kernels.interrupt_safe():
                return self.network(x.flatten(0, 1)).unflatten(0, (self.members, -1))


def _stacked_niti_layer(module: nn.Module, layers: list[nn.Module], members: int) -> nn.Module | None:
    """The members' `layers` (each member's at one place in the network, `module` the first's) as one
    stacked layer, or None where the layer runs as written on the folded batch."""
    from dse.train.stacked import PerMemberLayer

    if isinstance(module, NitiConv):
        return StackedNitiConv([layer for layer in layers if isinstance(layer, NitiConv)])
    if isinstance(module, NitiLinear):
        return StackedNitiLinear([layer for layer in layers if isinstance(layer, NitiLinear)])
    if isinstance(module, NitiEmbedding):
        return StackedNitiEmbedding([layer for layer in layers if isinstance(layer, NitiEmbedding)])
    if isinstance(module, NitiMatmul):
        return StackedNitiMatmul(members, module.bitwidth)
    if (module._parameters or module._buffers) and not any(True for _ in module.children()):
        stacked = PerMemberLayer(layers, members)
        for stacked_param, param in zip(stacked.parameters(), module.parameters(), strict=True):
            stacked_param.requires_grad_(param.requires_grad)  # frozen under NITI: no gradient
        return stacked
    return None


def stack_niti_models(models: Sequence[nn.Module]) -> FoldedNitiNetwork:
    """One network from G NITI-converted networks of one architecture (`convert_model`: each with its
    own weights and exponents): NITI layers stacked, other layers with weights or buffers of their
    own (BatchNorm, LayerNorm, a position table: frozen under NITI, BatchNorm with each member's batch
    statistics) run per member (dse/train/stacked.py `PerMemberLayer`), the rest as written;
    `niti_stack_reason` says which networks it takes. A layer applied at two places (its NITI
    weight one state, as alone) is one stacked layer at both."""
    members = len(models)
    network = copy.deepcopy(models[0])
    by_name = [dict(model.named_modules(remove_duplicate=False)) for model in models]
    stacked: dict[int, nn.Module] = {}  # by the copy's module, or by the NITI weight its places share
    places: list[tuple[str, nn.Module]] = []
    for name, module in network.named_modules(remove_duplicate=False):
        if not name:
            continue
        weight = getattr(module, "niti_weight", None)
        key = id(weight) if isinstance(weight, NitiWeight) else id(module)
        if key not in stacked:
            layer = _stacked_niti_layer(module, [modules[name] for modules in by_name], members)
            if layer is None:
                continue
            stacked[key] = layer
        places.append((name, stacked[key]))
    for name, layer in places:
        parent, _, child = name.rpartition(".")
        network.get_submodule(parent)._modules[child] = layer
    return FoldedNitiNetwork(network, members)


def stacked_weights(model: nn.Module) -> list[NitiWeight]:
    """The NITI weights of a stacked network, in layer order."""
    return [module.niti_weight for module in model.modules()
            if isinstance(module, (_StackedNitiGemm, StackedNitiEmbedding))]


class StackedNitiCrossEntropy(NitiCrossEntropy):
    """loss(logits (G, B, classes), targets (G, B)) -> each member's loss (G,); backward each member's
    integer error (`NitiCrossEntropy` of each member), drawn from its own generator."""

    def __init__(self, bitwidth: int, generators: MemberGenerators, division: str = "reference") -> None:
        super().__init__(bitwidth, generators, division)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        members, classes = logits.shape[0], logits.shape[-1]
        m_z, exps, slot = member_activation(logits.flatten(0, 1), members, self.bitwidth)
        return _CrossEntropyFunction.apply(_plain(logits), targets.reshape(members, -1), self,
                                           m_z.reshape(members, -1, classes), exps, slot)


STEP_CHUNK_ELEMENTS = 2**16
"""Weight entries an update works on at once. A stacked weight larger than this steps in chunks of
members, so that the update's elementwise passes stay in the cache: with the int64 update (before
`step_weight_`) a 256 x 256 weight of 8 members stepped in 17 ms instead of 31 ms (2-vCPU VM under
load)."""


class StackedNitiOptimizer:
    """`NitiOptimizer` of each member over the stacked weights: grad_calc with the member's mu (`mus`,
    set each epoch by the members' schedules; `step_weight_` per member), the same integer
    accumulator (copy_bits) per member."""

    def __init__(self, weights: Sequence[NitiWeight], mus: Sequence[int], bitwidth: int,
                 copy_bits: int | None = None) -> None:
        self.weights = list(weights)
        self.mus = list(mus)
        self.bitwidth = bitwidth
        self.frac_bits = 0 if copy_bits is None else copy_bits - bitwidth - 1
        self.accumulators = [weight.mantissa() << self.frac_bits for weight in weights if self.frac_bits]

    @torch.no_grad()
    def step(self) -> None:
        for index, weight in enumerate(self.weights):
            if weight.grad is None:
                continue
            param, exps = weight.param, _members_of(weight)
            chunk = max(1, STEP_CHUNK_ELEMENTS // param[0].numel())
            for start in range(0, len(exps), chunk):
                members = slice(start, start + chunk)
                if not self.frac_bits:
                    step_weight_(param[members], weight.grad[0][members].to(param.device), exps[members],
                                 self.mus[members], self.bitwidth)
                    continue
                update = grad_calc_members(weight.grad[0][members], self.mus[members], self.bitwidth)
                accumulator = int_clip(self.accumulators[index][members] - update.to(param.device),
                                       self.bitwidth + self.frac_bits)
                self.accumulators[index][members] = accumulator
                mantissa = psto_shift(accumulator, self.frac_bits, self.bitwidth)
                param[members] = _value(mantissa, exps[members], param.dtype)

    def zero_grad(self) -> None:
        for weight in self.weights:
            weight.param.grad = None
            weight.grad = None
