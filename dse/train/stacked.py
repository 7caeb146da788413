"""A group of networks of one architecture as one stacked network: every weight carries a leading
member axis, and the members' batches travel through the network's own forward folded into one
batch (member g's samples are rows g*B .. (g+1)*B-1), so every layer without weights (activations,
pooling, reshapes, residual additions, softmax) runs once for the whole group, exactly as it runs
for each member alone.

Layers with weights take the folded batch apart:
- Linear: its three GEMMs for all members in one batched call. With weights W (G, out, in) and
  inputs x (G, B, ..., in), per member g

      forward          y[g]  = Qa(x)[g] @ Qw(W)[g]^T + b[g]           (torch.baddbmm)
      backward-data    dx[g] = Qe(dy)[g] @ Qw(W)[g]                    (torch.bmm)
      backward-weight  dW[g] = Qwg(Qe(dy)[g]^T @ Qa(x)[g])             (torch.bmm)   db[g] = sum Qe(dy)[g]

  Each member's operands and output at the addresses they have alone (`at_alone_alignment`: MKL on
  an AMD EPYC sums otherwise off a 16-byte boundary). Where the batched GEMM would not sum as each
  member's own (`bmm_sums_as_mm`: torch's own loop for products under 400 multiply-adds, MKL's
  batched GEMM for a single row, column or reduction index; else where a probe finds it would not,
  dse/train/batched_sums.py), the GEMMs run member by member (`member_gemm`).
- Conv1d/Conv2d: the operands are quantized for all members in one call; each of the three
  convolution products runs as one grouped convolution (groups = G over channel-stacked members)
  where a probe of its layout finds it gives every member its own call's bits (signed zeros too),
  else member by member (`StackedConvOp`): oneDNN picks its algorithm for a grouped call by shape,
  and on some shapes it sums otherwise than a member's own (docs/training.md lists the proxies').
- Matmul (attention's q k^T and p v): both operands quantized per member, one batched matmul
  (member by member where a probe finds it would not sum as the member's own).
- Any other layer with weights or buffers of its own and no layers inside (BatchNorm, LayerNorm,
  Embedding, PositionEmbedding, a user's own leaf layer): run member by member with the member's own
  weights and buffers (`PerMemberLayer`), so its statistics (BatchNorm's batch statistics and
  running averages) are each member's own; each read of its input reaches the folded input's
  gradient as a term of its own, in autograd's order alone (`_MemberReads`); its input, weights and
  output gradient at each member's alignment alone.
- GEMMs the forward calls as functions (F.linear on a parameter, `x @ self.w`, torch.bmm, F.conv2d,
  attention, nn.MultiheadAttention): the tensors they take are stacked in place and their module runs
  on the folded batch; the torch-function mode runs each such GEMM per member
  (dse/train/stacked_functional.py).

Quantizers are the members' own (`TensorQuant.members`: a scale per member, stochastic rounding
from each member's generator), and so are accumulators (the accumulation emulation): a batched
Linear or Matmul folds each GEMM chunk by chunk over the same reduction indices as the member's GEMM
alone (a chunk is one batched matmul, the accumulator rounds per member); a convolution folds each
member's GEMMs with that member's own accumulator.

A network stacks when `stack_reason` finds nothing against it: no GEMM function taking a view of a
parameter or a parameter also used otherwise, no layer holding GEMM operands beside other tensors, no
weights shared between layers or held beside layers, and - checked by one forward of two differing
members on two samples - a batch along the first axis of every layer's input and no random draws
from torch's global generator (dropout), which a group cannot split per member.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dse.formats.base import MemberGenerators
from dse.models.layers import Matmul, PositionEmbedding
from dse.train import accumulation
from dse.train.accumulation import Accumulator, OperandPartial
from dse.train.attributes import (
    MODULE_INTERNALS,
    Attributes,
    held,
    modules_outside,
    plain_data,
    same_attribute,
)
from dse.train.batched_sums import (
    aligned_sums_as_members,
    alignment_bytes,
    at_alone_alignment,
    bmm_sums_as_mm,
    empty_at_alone_alignment,
    member_layouts,
    output_shape,
    sums_as_members,
    unprobed,
)
from dse.train.layers import (
    LINEAR_AXES,
    BlockQuantizer,
    ConvOp,
    GemmAxes,
    LayerPolicies,
    LayerQuant,
    MemberRanks,
    QuantGemm,
    Quantizer,
    QuantSwitch,
    UnconvertedGemmWarning,
    _on_axis,
    conv_geometry,
    is_block_scaled,
    quant_matmul,
)
from dse.train.member_kernels import (
    INNER_SUM_FUNCTIONS,
    OWN_PACKAGE,
    PARALLEL_GRAIN,
    AmbiguousMemberAxisWarning,
    MemberKernels,
    a_term_per_use,
    cat_as_alone,
    may_call_position_dependent,
)
from dse.train.policy import QuantPolicy, TensorQuant

if TYPE_CHECKING:
    from dse.train.functional import FoundGemms

GEMM_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, Matmul)
"""Layers stacked as GEMMs (exactly these classes; anything else with weights runs per member)."""


def _gemms(model: nn.Module, example: Tensor | None) -> FoundGemms:
    """The model's GEMMs as `quantize_model` finds them for a trial alone (functional ones with an
    example of two samples), with the tensors functional GEMMs take and what else takes them."""
    from dse.train.functional import find_gemms

    return find_gemms(model, None if example is None else example[:2])


def layer_policies(policy: QuantPolicy, found: FoundGemms) -> LayerPolicies:
    """Each GEMM's policy, as `quantize_model` resolves it for a trial alone: per-layer rules and
    full-precision layers over the trial's policy, by the GEMM's name and place among all of them."""
    return LayerPolicies(policy, [site.layer for site in found.sites])


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**{n: p for n, p in module._parameters.items() if p is not None},
            **{n: b for n, b in module._buffers.items() if b is not None}}


def _holds_state(module: nn.Module) -> bool:
    """Whether the module holds tensors of its own, a buffer registered as None included (its forward
    may set it: each member's own, as alone)."""
    return bool(_own_tensors(module)) or any(b is None for b in module._buffers.values())


def _operand_tensors(name: str, module: nn.Module, found: FoundGemms) -> list[str]:
    """The module's own tensors that functional GEMMs take as operands (stacked in place)."""
    return [t for t in _own_tensors(module) if _join(name, t) in found.operands]


def _join(owner: str, part: str) -> str:
    return f"{owner}.{part}" if owner else part


def structure_reason(model: nn.Module, found: FoundGemms | None = None) -> str | None:
    """Why the layers of `model` do not stack (None: they do), from the module tree and `found`
    (its GEMMs; by default those the module tree shows)."""
    found = found if found is not None else _gemms(model, None)
    outside = _outside_reason(model)
    if outside is not None:
        return outside
    owners: dict[int, str] = {}
    runs_per_member: dict[str, str] = {}
    for name, module in model.named_modules():
        own = _own_tensors(module)
        operands = _operand_tensors(name, module, found)
        label = f"its {type(module).__name__} {name or '(the model)'}"
        for tensor_name in (own if type(module) in GEMM_LAYER_TYPES else operands):
            use = found.other_uses.get(_join(name, tensor_name))
            if use is not None and _join(name, tensor_name) in found.operands:
                return (f"{_join(name, tensor_name)} is a GEMM's operand and also taken by {use}; a stacked "
                        f"network can pass a member's parameter to a GEMM function only as it is")
        if operands and len(operands) < len(own) and type(module) not in GEMM_LAYER_TYPES:
            others = [t for t in own if t not in operands]
            if isinstance(module, nn.MultiheadAttention):
                return (f"{label} adds {', '.join(others)} to every member's keys and values (add_bias_kv), "
                        f"which does not stack yet")
            return (f"{label} holds {', '.join(others)} beside the GEMM operands {', '.join(operands)}; "
                    f"move them into a layer of their own")
        if type(module) not in GEMM_LAYER_TYPES and _holds_state(module) and not operands:
            if any(True for _ in module.children()):
                held = [*own, *(n for n, b in module._buffers.items() if b is None)]
                return (f"{label} holds weights of its own ({', '.join(held)}) beside its layers; wrap them "
                        f"in a layer of their own")
            runs_per_member[name] = label
        for tensor_name, tensor in own.items():
            if id(tensor) in owners:
                return f"{owners[id(tensor)]} and {name}.{tensor_name} are one tensor (tied weights)"
            owners[id(tensor)] = f"{name}.{tensor_name}" if name else tensor_name
    for site in found.sites:
        owner = site.layer.aliases[0] if site.layer.aliases else ""
        if site.module is None and not site.layer.has_weight and owner in runs_per_member:
            return (f"{runs_per_member[owner]} runs member by member (it holds weights or buffers used "
                    f"outside GEMMs) and calls the GEMM {site.layer.name} as a function")
    return None


def _outside_reason(model: nn.Module) -> str | None:
    """A module held outside the module tree (`modules_outside`) with state of its own (weights,
    buffers, or a user's module's Python attributes): a group runs the first trial's copy for every
    member, where alone each trial runs its own (its weights drawn per trial; the forward check's
    second member, its tree's parameters changed, shares it too)."""
    for where, module in modules_outside(model):
        if (_holds_state(module) or not type(module).__module__.startswith("torch.")) and not isinstance(
                module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            return (f"it holds a {type(module).__name__} in {where} outside its module tree (a plain "
                    f"attribute, or a Python list or dict rather than nn.ModuleList / nn.ModuleDict), and a "
                    f"group would run the first trial's copy of it for every member")
    return None


def stack_reason(model: nn.Module, example: Tensor | None = None) -> str | None:
    """Why `model` cannot be stacked (None: it can), under any quantization. `example` (two or more
    samples) finds the GEMMs the forward calls as functions and runs the check forward of the module
    docstring."""
    found = _gemms(model, example)
    reason = structure_reason(model, found)
    if reason is None and example is not None:
        reason = _forward_reason(model, example)
    return reason


def functional_reason(model: nn.Module, example: Tensor | None) -> str | None:
    """The GEMMs the model calls as functions, for methods that stack module GEMMs only (NITI)."""
    functional = [site.layer.name for site in _gemms(model, example).sites if site.module is None]
    if functional:
        return f"its GEMMs {', '.join(functional)} are function calls, which NITI does not stack"
    return None


def _forward_reason(model: nn.Module, example: Tensor) -> str | None:
    """Stack the model with a second member of other weights, run two samples through both members
    and each member alone (training mode, on copies): None when each member's output is its own."""
    example = example[:2]
    members = [copy.deepcopy(model) for _ in range(2)]
    with torch.no_grad():
        for p in members[1].parameters():
            p.mul_(-0.75).add_(0.125)
    inputs = [example, example[:1].expand_as(example).clone()]  # (the first sample twice: a statistic of
    # each member's batch, raw input's too, differs)
    devices = [example.device] if example.is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), unprobed():
        stacked = stack_models([copy.deepcopy(m) for m in members], None, QuantSwitch(), None, example)
        before = _rng_states(devices)
        attributes = {name: Attributes(module) for name, module in stacked.net.named_modules()
                      if not type(module).__module__.startswith(OWN_PACKAGE)}
        reads = _MemberTensorsRead(stacked.net)
        try:
            with warnings.catch_warnings(), reads:  # two samples each: a coincidence of sizes says nothing
                warnings.simplefilter("ignore", AmbiguousMemberAxisWarning)
                together = stacked(torch.stack(inputs))
        except Exception as error:  # a layer that cannot take the folded batch
            return reads.reason() or (f"its forward fails on a folded batch ({type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''})")
        finally:
            reads.remove()
        if reads.reason() is not None:
            return reads.reason()
        if any(not torch.equal(a, b) for a, b in zip(before, _rng_states(devices), strict=True)):
            return "its forward draws random numbers (dropout?) from torch's global generator"
        alone = [member(x) for member, x in zip(members, inputs, strict=True)]
    written = _shared_attributes_written(stacked.net, attributes, members)
    if written is not None:
        return written
    for g, out in enumerate(alone):
        if together[g].shape != out.shape or not torch.allclose(together[g], out, rtol=1e-4, atol=1e-5):
            return ("a member's output is not its own when stacked (a layer sees its batch on another "
                    "axis than the first, or mixes samples)")
    return None


class _MemberTensorsRead(TorchFunctionMode):
    """Records the first torch call outside every layer of `net` run member by member
    (`PerMemberLayer`) that takes one of those layers' own tensors: there the tensor stacks every
    member's (a parameter the network reads as `self.leaf.weight`, tied to another use), where alone
    the call takes the member's own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        layers = [(name, m) for name, m in net.named_modules() if isinstance(m, PerMemberLayer)]
        self.tensors = {id(t): _join(name, own) for name, m in layers for own, t in _own_tensors(m).items()}
        self.inside = 0
        self.read: str | None = None
        self.handles = [handle for _, m in layers for handle in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._exit, always_call=True))]

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.inside += 1

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self.inside -= 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def reason(self) -> str | None:
        if self.read is None:
            return None
        return (f"its forward takes {self.read}, a tensor of a layer the group runs member by member, "
                f"outside that layer (a tied or shared parameter), where the group's tensor holds every "
                f"member's")

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.inside and self.read is None:
            self.read = next((name for t in _tensors(args, kwargs)
                              if (name := self.tensors.get(id(t))) is not None), None)
        return func(*args, **kwargs)


def _shared_attributes_written(net: nn.Module, before: Mapping[str, Attributes],
                               members: Sequence[nn.Module]) -> str | None:
    """Which module that a group runs once for all its members (not one of dse's layers: a user's
    network or weightless layer) changed a Python attribute in its forward (`before`: each one's
    attributes before it) other than each member's own forward alone changed it (a running float, a
    list of its batches' statistics): a group would share that attribute among its members, where
    alone each trial keeps its own (None: none)."""
    alone = [dict(member.named_modules()) for member in members]
    for name, kept in before.items():
        module = net.get_submodule(name)
        own = [modules.get(name) for modules in alone]
        differing = [attribute for attribute in kept.changed()
                     if any(m is None or not same_attribute(module, m, attribute) for m in own)]
        if differing:
            return (f"its {type(module).__name__} {name or '(the model)'} writes {', '.join(differing)} in "
                    f"its forward from its batch, and a group runs it once for all its members, who would "
                    f"share that state (alone each trial keeps its own)")
    return None


def _rng_states(devices: list[torch.device]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(device) for device in devices)]


# --- the operations of stacked layers -------------------------------------------------------------


def _split(x: Tensor, members: int) -> Tensor:
    """(G*B, ...) -> (G, B, ...)."""
    return x.view(members, x.shape[0] // members, *x.shape[1:])


def _fold(x: Tensor) -> Tensor:
    """(G, B, ...) -> (G*B, ...)."""
    return x.reshape(-1, *x.shape[2:])


def member_gemm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a[g] @ b[g] (+ bias[g]) for each member g: a (G, m, k), b (G, k, n), bias (G, n), each member's
    operands and output at the addresses they have alone (`at_alone_alignment`). One batched GEMM where
    it sums each member's product as the member's own mm / addmm alone (`batched_sums.sums_as_members`:
    on the CPU `bmm_sums_as_mm` backed by a probe, on a GPU a probe; decided with the alignment once a
    layout: `aligned_sums_as_members`); otherwise member by member, with the call each member makes
    alone. At two threads torch splits a member's mm among the threads but a bmm by its batch entries,
    each entry's GEMM on one thread, and a long reduction (the weight gradient's batch rows) then sums
    in another order (measured on torch 2.13: every Linear weight gradient of the transformer proxy at
    2 threads)."""
    members, rows, reduction = a.shape
    columns = b.shape[2]
    given = (a, b) if bias is None else (a, b, bias)  # (a bias is copied into the output first: its
    padded = _pads(members, rows * columns * a.element_size(), a)  # address never reaches the BLAS)
    operands: tuple[Tensor, ...]
    if padded and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad  # autograd records
                                               or (bias is not None and bias.requires_grad)):  # no out=
        sums, operands = False, (at_alone_alignment(a), at_alone_alignment(b), *given[2:])
    else:  # (`padded` is of the shapes alone: the same at alone's alignment)
        sums, operands = aligned_sums_as_members("baddbmm" if bias is not None else "bmm", _batched_gemm,
                                                 _own_gemm, given, bmm_sums_as_mm(rows, reduction, columns),
                                                 aligning=2)
    if not sums:
        return torch.stack([_own_gemm(*(o[g] for o in operands)) for g in range(members)])
    return _batched_gemm(*operands, padded=padded)


def _batched_gemm(a: Tensor, b: Tensor, bias: Tensor | None = None, *, padded: bool | None = None) -> Tensor:
    """The batched GEMM, its output's member blocks where a member's fresh output is alone (torch's own
    output where its blocks' size is a multiple of the alignment, else a padded one; `padded`:
    `_pads_output(a, b)` where the caller knows it)."""
    if not (_pads_output(a, b) if padded is None else padded):
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias.unsqueeze(1), a, b)
    out = empty_at_alone_alignment((a.shape[1], b.shape[2]), a.shape[0], a)
    return torch.bmm(a, b, out=out) if bias is None else torch.baddbmm(bias.unsqueeze(1), a, b, out=out)


def _pads_output(a: Tensor, b: Tensor) -> bool:
    """Whether a[g] @ b[g]'s output blocks, contiguous, would start off a fresh tensor's alignment."""
    return _pads(a.shape[0], a.shape[1] * b.shape[2] * a.element_size(), a)


def _pads(members: int, block_bytes: int, like: Tensor) -> bool:
    """Whether `members` contiguous output blocks of `block_bytes` each on `like`'s device would start off
    a fresh tensor's alignment."""
    return members > 1 and block_bytes % alignment_bytes(like) != 0


def _own_gemm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """A member's GEMM as it runs alone."""
    return a @ b if bias is None else torch.addmm(bias, a, b)


class StackedLinearOp:
    """The GEMMs of the module docstring for all members at once: x (G, B, ..., in), w (G, out, in).

    An op of the shared `QuantGemm` (dse/train/layers.py), which quantizes the operands around it.
    With an accumulator each GEMM is folded chunk by chunk over the same reduction indices as a
    member's Linear alone (dse/train/accumulation.py): in_features forward, out_features
    backward-data, the batch rows backward-weight; the chunks are batched matmuls.
    """

    @property
    def axes(self) -> GemmAxes:
        return LINEAR_AXES

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _unrows(member_gemm(_rows(x), weight.transpose(1, 2), bias), x, weight.shape[1])

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        errors = _rows(dy)
        if need_data and need_weight and errors.is_contiguous():
            errors = at_alone_alignment(errors)  # once for both GEMMs: its transpose is what
            # `at_alone_alignment` of the transposed errors gives (the same strides and shift)
        dx = _unrows(member_gemm(errors, weight), x, x.shape[-1]) if need_data else None
        dw = member_gemm(errors.transpose(1, 2), _rows(x)) if need_weight else None
        return dx, dw

    def bias_grad(self, dy: Tensor) -> Tensor:
        return _rows(dy).sum(1)

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor:
        y = accumulation.matmul_forward(_rows(x), weight.transpose(1, 2), accumulator)
        y = y if bias is None else y + bias.unsqueeze(1)
        return _unrows(y, x, weight.shape[1])

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]:
        errors = _rows(dy)
        dx = _unrows(accumulation.matmul_forward(errors, weight, accumulator), x, x.shape[-1]) \
            if need_data else None
        dw = accumulation.matmul_backward_b(errors, _rows(x), accumulator) if need_weight else None
        return dx, dw


def _rows(t: Tensor) -> Tensor:
    """A stacked Linear's operand (G, B, ..., features) as (G, rows, features) (as it is where 3-d)."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def _unrows(y: Tensor, like: Tensor, features: int) -> Tensor:
    """A GEMM's (G, rows, features) result in the shape of its operand `like`, with `features` last."""
    return y if like.dim() == 3 else y.view(*like.shape[:-1], features)


class PlainStackedLinearOp(StackedLinearOp):
    """The GEMMs of the members' plain fp32 Linear, as torch's autograd of `F.linear` runs them alone:
    for a member's input batch-innermost in memory (a (B, in) view of an (in, B) tensor: a layer's
    transposed output) torch computes the input's gradient as (W^T dy^T)^T, in that layout
    (`mm_mat1_backward`), where `dy @ W` is contiguous and sums otherwise (all 9 shapes of 7 rows
    measured on a 2-vCPU AMD EPYC, none of 14, 50 or 64). The group's gradient then lies
    batch-innermost over all members (`cat_as_alone`'s layout), which a layer run member by member
    hands each member as alone (a reduction over its other axis still sums across the members'
    samples: docs/training.md, *Grouped training*)."""

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        if not (need_data and x.dim() == 3 and x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1):
            return super().backward(dy, x, weight, need_data, need_weight)
        _, dw = super().backward(dy, x, weight, False, need_weight)
        members, rows, features = x.shape
        transposed = member_gemm(weight.transpose(1, 2), dy.transpose(1, 2))  # (G, in, B)
        joined = torch.empty(features, members * rows, dtype=dy.dtype, device=dy.device)
        joined.view(features, members, rows).copy_(transposed.permute(1, 0, 2))
        return joined.t().view(members, rows, features), dw


_STACKED_LINEAR = StackedLinearOp()
_FP32_GEMM = LayerQuant(PlainStackedLinearOp(), None, None, None, None, QuantSwitch())
"""A stacked Linear's GEMMs in fp32. Not torch's autograd of baddbmm: that gives the weight gradient
as a transposed view, which autograd copies into the contiguous .grad on every step (that copy was 14 % of
the profiled fp32 step of a group of 16)."""


@dataclasses.dataclass(frozen=True)
class StackedConvOp:
    """A convolution's GEMMs (ConvOp) over stacked operands (leading member axis). Each of its three
    products - forward, backward-data, backward-weight (with the bias gradient where torch's autograd
    computes it in the same call, `plain_grads`) - runs as one grouped convolution (groups = G x the
    layer's, the members' channels stacked) where a probe of its layout finds that call gives every
    member its own product's bits, signed zeros included (never timed: the path would follow the load)
    (`batched_sums.member_layouts`), else member by member, each member's own call. Either way each
    member's output lies in the layout it has alone (`stack_as_alone`, `_members_in_layouts`): a
    layout orders later sums. Accumulated GEMMs run member by member, each with its member's
    accumulator."""

    op: ConvOp

    @property
    def axes(self) -> GemmAxes:
        return self.op.axes

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        operands = (x, weight) if bias is None else (x, weight, bias)
        layouts = member_layouts(("convolution", self.op), self._grouped_forward, self._member_forward,
                                 operands)
        if layouts is None:
            return stack_as_alone([self.op.forward(x[g], weight[g], _member(bias, g)) for g in range(len(x))])
        return _members_in_layouts(self._grouped_forward(*operands), layouts)[0]

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        dx, dw, _ = self.plain_grads(dy, x, weight, (need_data, need_weight, False))
        return dx, dw

    def plain_grads(self, dy: Tensor, x: Tensor, weight: Tensor,
                    mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(dL/dx, dL/dw, dL/db) where `mask` asks for them, the bias's as `convolution_backward`
        sums it (what torch's autograd gives a member's plain convolution alone: its fp32 training).
        Where neither product runs grouped, each member's one call with `mask`, as alone."""
        need_data, need_weight, need_bias = mask
        operands = (dy, x, weight)
        data = member_layouts(("convolution backward-data", self.op), self._grouped_data, self._member_data,
                              operands) if need_data else None
        weight_mask = (False, need_weight, need_bias)
        grouped_weight = functools.partial(self._grouped_weight, weight_mask)
        weights = member_layouts(("convolution backward-weight", self.op, weight_mask), grouped_weight,
                                 functools.partial(self._member_grads, weight_mask), operands) \
            if need_weight or need_bias else None
        if data is None and weights is None:
            return self._each_member(mask, dy, x, weight)
        dx = None if not need_data else self._each_member((True, False, False), dy, x, weight)[0] \
            if data is None else _members_in_layouts(self._grouped_data(*operands), data)[0]
        _, dw, db = self._each_member(weight_mask, dy, x, weight) if weights is None else \
            (None, *_each_asked(weight_mask[1:], _members_in_layouts(grouped_weight(*operands), weights)))
        return dx, dw, db

    def _each_member(self, mask: tuple[bool, bool, bool], dy: Tensor, x: Tensor,
                     weight: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients `mask` asks for, each member's own call (`convolution_backward`), stacked."""
        grads = [self._conv_grads(dy[g], x[g], weight[g], mask, 1) for g in range(len(x))]
        dx, dw, db = (stack_as_alone([own[i] for own in grads]) if mask[i] else None for i in range(3))
        return dx, dw, db

    def bias_grad(self, dy: Tensor) -> Tensor:
        return torch.stack([self.op.bias_grad(d) for d in dy.unbind(0)])

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor:
        each = _each(accumulator)
        return stack_as_alone([self.op.forward_accumulated(x[g], weight[g], _member(bias, g), each[g])
                               for g in range(len(x))])

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]:
        each = _each(accumulator)
        grads = [self.op.backward_accumulated(dy[g], x[g], weight[g], need_data, need_weight, each[g])
                 for g in range(len(x))]
        dx = stack_as_alone([dx for dx, _ in grads if dx is not None]) if need_data else None
        dw = stack_as_alone([dw for _, dw in grads if dw is not None]) if need_weight else None
        return dx, dw

    # --- a member's own products, and the group's as one grouped convolution ------------------------

    def _member_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.op.forward(x, weight, bias)

    def _member_data(self, dy: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        return self._member_grads((True, False, False), dy, x, weight)[0]

    def _member_grads(self, mask: tuple[bool, bool, bool], dy: Tensor, x: Tensor,
                      weight: Tensor) -> tuple[Tensor, ...]:
        """`convolution_backward`'s outputs asked for by `mask`, as a member's own call alone."""
        return tuple(grad for grad, needed in zip(self._conv_grads(dy, x, weight, mask, 1), mask, strict=True)
                     if needed)

    def _conv_grads(self, dy: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, bool, bool],
                    members: int) -> tuple[Tensor, Tensor, Tensor]:
        op = self.op
        bias_sizes = [weight.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(dy, x, weight, bias_sizes, list(op.stride),
                                                   list(op.padding), list(op.dilation), False,
                                                   [0] * len(op.stride), op.groups * members, list(mask))

    def _grouped_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        members = x.shape[0]
        y = accumulation.convolution(_join_members(x, 1), _join_members(weight, 0),
                                     None if bias is None else _join_members(bias, 0), self.op.stride,
                                     self.op.padding, self.op.dilation, self.op.groups * members)
        return y.unflatten(1, (members, -1)).movedim(1, 0)

    def _grouped_data(self, dy: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        members = x.shape[0]
        dx = self._conv_grads(_join_members(dy, 1), _join_members(x, 1), _join_members(weight, 0),
                              (True, False, False), members)[0]
        return dx.unflatten(1, (members, -1)).movedim(1, 0)

    def _grouped_weight(self, mask: tuple[bool, bool, bool], dy: Tensor, x: Tensor,
                        weight: Tensor) -> tuple[Tensor, ...]:
        members = x.shape[0]
        _, dw, db = self._conv_grads(_join_members(dy, 1), _join_members(x, 1), _join_members(weight, 0),
                                     mask, members)
        return tuple(grad.unflatten(0, (members, -1)) for grad, needed in zip((dw, db), mask[1:], strict=True)
                     if needed)


def _join_members(t: Tensor, axis: int) -> Tensor:
    """`t` (a leading member axis) as one tensor of a member's dimensions whose `axis` holds every
    member's entries in turn (member g's at g x its size): a grouped convolution's operand. Laid out
    in the member's order of dimensions, the members just outside `axis` (channels innermost alone:
    channels innermost here), so that the library meets the layout the member's own call meets."""
    member = t[0]
    order = sorted(range(member.dim()), key=lambda d: (-member.stride()[d], d))  # outermost first
    permutation = [axis_of_t for d in order for axis_of_t in ((0, d + 1) if d == axis else (d + 1,))]
    dense = t.permute(permutation).contiguous()
    joined_at = permutation.index(0)
    joined = dense.flatten(joined_at, joined_at + 1)
    return joined.permute([order.index(d) for d in range(member.dim())])


def _each_asked(asked: Sequence[bool], outputs: Sequence[Tensor]) -> list[Tensor | None]:
    """`outputs` (those asked for, in turn) in the places of `asked`, None where not asked."""
    given = iter(outputs)
    return [next(given) if wanted else None for wanted in asked]


def _members_in_layouts(outputs: Tensor | tuple[Tensor, ...], layouts: tuple[tuple[int, ...], ...]
                        ) -> tuple[Tensor, ...]:
    """Each of `outputs` (a leading member axis) copied into one stacked tensor whose members' slices
    lie as a member's own output of the strides in `layouts` lies alone (as `stack_as_alone`)."""
    outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
    return tuple(_empty_members(len(t), t.shape[1:], strides, t).copy_(t)
                 for t, strides in zip(outputs, layouts, strict=True))


def _member(tensor: Tensor | None, g: int) -> Tensor | None:
    return None if tensor is None else tensor[g]


def stack_as_alone(members: list[Tensor]) -> Tensor:
    """Members' tensors on a leading member axis, each member's slice in the memory layout it has alone.

    torch.stack makes every slice contiguous, and a layout decides the order of later reductions: a
    convolution over an MX-quantized input (a block-padded view, channels innermost) returns its output
    channels-last, the ReLU after it keeps that layout into its backward, and the bias gradient that sums
    that error over batch and positions summed it in another order in a group than alone (up to 6e-9 on
    the MNIST-1D CNN under MXFP8 with pseudo-stochastic rounding).
    """
    first = members[0]
    if first.is_contiguous() or any(t.stride() != first.stride() for t in members):
        return torch.stack(members)
    out = _empty_members(len(members), first.shape, first.stride(), first)
    for g, t in enumerate(members):
        out[g].copy_(t)
    return out


def _empty_members(members: int, shape: Sequence[int], strides: Sequence[int], like: Tensor) -> Tensor:
    """An empty (members, *shape) tensor whose member slices are each dense in the order of dimensions of
    `strides` (contiguous where a tensor of them is), one after another: `stack_as_alone`'s layout."""
    inner = _dense_strides(tuple(shape), tuple(strides))
    numel = math.prod(shape)
    return torch.empty_strided((members, *shape), (numel, *inner), dtype=like.dtype, device=like.device)


@functools.cache
def _dense_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """A dense tensor's strides in the order of dimensions of `strides` (contiguous's where a tensor of
    them is contiguous), as torch.empty_like gives them."""
    model = torch.empty_strided(shape, strides, device="meta")
    return torch.empty(shape, device="meta").stride() if model.is_contiguous() else \
        torch.empty_like(model).stride()


@dataclasses.dataclass(frozen=True)
class MemberAccumulators(Accumulator):
    """The members' accumulators: `quantize` rounds a stacked tensor per member (leading member
    axis); `each[g]` is member g's own, for GEMMs run member by member; `runs_of(members)` those of
    a run of consecutive members.

    A batched GEMM folds over runs of consecutive members whose chunk stays under torch's parallel
    grain (`fold_gemm`), a run of one as the member alone: a fold is a few small operations per chunk
    (hundreds of chunks per GEMM), and a chunk of the whole group over the grain where a member's is
    under it made every one of them open a parallel region on several threads (the transformer's FFN
    weight gradient at 2 threads: 2.6-7x the CPU time of its members' folds alone), and on one thread
    a transformer group member trained at 0.78-0.80x of alone against 0.90x in runs (the larger
    chunks leave the cache; docs/training.md). Either way every member's chunks are the same matmuls
    over the same reduction indices, rounded by its own accumulator: the results do not depend on it.
    Where a batched chunk would not sum as the member's own GEMM (`batched_sums.sums_as_members`: on
    the CPU `bmm_sums_as_mm` - torch's loop for small products, a single row, column or reduction
    index - and at more threads a probe too) the fold runs member by member. On a GPU (no grain;
    launch-bound) the whole group folds at once where a probe finds its chunks sum as the members'."""

    each: tuple[Accumulator, ...] = ()
    runs_of: Callable[[slice], Accumulator] | None = None

    def fold_gemm(self, partial: OperandPartial, operands: tuple[Tensor, ...], length: int) -> Tensor:
        members = operands[0].shape[0]
        if self.runs_of is None or length <= 0 \
                or any(operand.shape[0] != members for operand in operands):
            return super().fold_gemm(partial, operands, length)
        operands = tuple(at_alone_alignment(o) for o in operands)  # each member's chunks where alone
        if not operands[0].is_cpu:  # a GPU: no grain, launch-bound: the whole group at once
            return self._fold_runs(partial, operands, length, members)
        if length <= self.chunk:  # one chunk: the group's at once where it sums as each member's
            if self._chunks_sum_as_members(partial, operands, length):
                return self.quantize(partial(*operands, 0, length))
            return self._each_member(partial, operands, length)
        # member 0's first chunk alone, which its fold starts from where members fold one by one
        first = partial(*(operand[0] for operand in operands), 0, self.chunk)
        run = max(1, (PARALLEL_GRAIN - 1) // max(1, first.numel()))
        return self._fold_runs(partial, operands, length, run, first)

    def _chunks_sum_as_members(self, partial: OperandPartial, operands: tuple[Tensor, ...], length: int
                               ) -> bool:
        """Whether the fold's chunks of `operands` (a run of members), each one batched matmul, sum as
        each member's own GEMM (`sums_as_members`; the CPU's rule `bmm_sums_as_mm` of the chunk's
        rows, reduction and columns, known before any chunk is computed): the first, the last (which
        may be shorter), and a middle one for each other alignment a chunk's operands start at (a
        chunk starting `start` reduction indices in starts its operands `start` x stride x element
        size bytes further, modulo `alignment_bytes` a function of `start` x element size alone)."""
        def rule(start: int, stop: int) -> Callable[[], bool]:
            def chunk_sums_as_mm() -> bool:  # (computed once a layout: `sums_as_members` keeps it)
                shape = output_shape(partial, *operands, start, stop)
                return bmm_sums_as_mm(shape[-2], stop - start, shape[-1])
            return chunk_sums_as_mm

        last = self.chunk * ((length - 1) // self.chunk)  # the last chunk's start
        chunks = {(0, min(self.chunk, length)), (last, length)}
        def offsets(start: int) -> tuple[int, ...]:
            return tuple(start * o.element_size() % alignment_bytes(o) for o in operands)
        seen = {offsets(0)}
        period = max(alignment_bytes(o) // math.gcd(self.chunk * o.element_size(), alignment_bytes(o))
                     for o in operands)  # the chunks' offsets repeat after this many (1: all alike)
        for start in range(self.chunk, min(last, self.chunk * period), self.chunk):
            if offsets(start) not in seen:
                seen.add(offsets(start))
                chunks.add((start, start + self.chunk))
        products = {bounds: functools.partial(_chunk, partial, *bounds) for bounds in chunks}
        return all(sums_as_members(("fold", partial, *bounds), product, product, operands, rule(*bounds))
                   for bounds, product in products.items())

    def _fold_runs(self, partial: OperandPartial, operands: tuple[Tensor, ...], length: int, run: int,
                   first: Tensor | None = None) -> Tensor:
        """The fold over runs of `run` consecutive members (the last may be shorter; `run` >= the
        group: one run): a run of several members' chunks one batched matmul where they sum as each
        member's own GEMMs, else (and a run of one) member by member (`first`: member 0's first chunk)."""
        members = operands[0].shape[0]
        parts = []
        for start in range(0, members, run):
            part = slice(start, min(start + run, members))
            ops = tuple(operand[part] for operand in operands)
            if part.stop - part.start > 1 and self._chunks_sum_as_members(partial, ops, length):
                parts.append(self._fold_run(part, partial, ops, length))
            else:
                parts.append(self._each_member(partial, ops, length, first if start == 0 else None, start))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _each_member(self, partial: OperandPartial, operands: tuple[Tensor, ...], length: int,
                     first: Tensor | None = None, offset: int = 0) -> Tensor:
        """The fold member by member, each with its own GEMMs and accumulator, as alone (operands:
        members `offset`, `offset` + 1, ...; `first`: the first one's first chunk)."""
        return torch.stack([self._fold_run(slice(offset + g, offset + g + 1), partial,
                                           tuple(o[g] for o in operands), length, first if g == 0 else None)
                            for g in range(operands[0].shape[0])])

    def _fold_run(self, part: slice, partial: OperandPartial, operands: tuple[Tensor, ...], length: int,
                  first: Tensor | None = None) -> Tensor:
        assert self.runs_of is not None
        return self.runs_of(part).fold(functools.partial(partial, *operands), length, first)


def _chunk(partial: OperandPartial, start: int, stop: int, *operands: Tensor) -> Tensor:
    return partial(*operands, start, stop)


def _each(accumulator: Accumulator) -> tuple[Accumulator, ...]:
    assert isinstance(accumulator, MemberAccumulators)
    return accumulator.each


def _accumulator(quant: TensorQuant, chunk: int, generators: MemberGenerators | None) -> Accumulator | None:
    """The members' accumulator of one GEMM layer (None: torch's fp32 sums)."""
    if not quant.enabled:
        return None
    members = [] if generators is None else generators.generators
    each = tuple(Accumulator(functools.partial(quant, generator=g), chunk) for g in members)
    return MemberAccumulators(functools.partial(quant.members, generator=generators), chunk, each,
                              _RunsOf(quant, chunk, generators))


@dataclasses.dataclass(frozen=True)
class _RunsOf:
    """Members `part`'s accumulators; one member's rounds as it does alone (no member axis). A class,
    not a closure, so that a group's layers pickle (as partials do, where lambdas do not)."""

    quant: TensorQuant
    chunk: int
    generators: MemberGenerators | None

    def __call__(self, part: slice) -> Accumulator:
        generators = self.generators
        if part.stop - part.start == 1:
            return Accumulator(functools.partial(self.quant, generator=None if generators is None
                                                 else generators.generators[part.start]), self.chunk)
        run = None if generators is None else MemberGenerators(generators.generators[part])
        return Accumulator(functools.partial(self.quant.members, generator=run), self.chunk)



def _members(quant: TensorQuant, generators: MemberGenerators | None) -> Quantizer | None:
    if not quant.enabled:
        return None
    if is_block_scaled(quant):
        return BlockQuantizer(quant, generators, members=True)
    return functools.partial(quant.members, generator=generators)


def _stacked_parameter(tensors: Sequence[Tensor | nn.Module | None]) -> nn.Parameter | None:
    """The members' tensors stacked along a new leading member axis (None where the layer has none); a
    frozen one (requires_grad=False) stays frozen, as the optimizer leaves it alone."""
    members = [t for t in tensors if isinstance(t, Tensor)]
    if not members:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in members]), requires_grad=members[0].requires_grad)


class StackedGemmLayer(nn.Module):
    """G GEMM layers of one shape (Linear, Conv1d, Conv2d): weight (G, ...), bias (G, out) or None;
    inputs folded (G*B, ...). `gemm_quant` None keeps the layer in fp32, as does a switched-off
    `QuantSwitch`: then it computes what each member's plain layer computes (a Linear: the same
    batched GEMMs with no quantizers, `_FP32_GEMM`; a convolution: `PlainStackedConv`)."""

    def __init__(self, layers: Sequence[nn.Module], members: int, gemm_quant: LayerQuant | None,
                 op: StackedLinearOp | StackedConvOp,
                 prepad: tuple[tuple[int, ...], str] | None = None) -> None:
        super().__init__()
        self.members = members
        weight = _stacked_parameter([layer.weight for layer in layers])
        assert weight is not None
        self.weight = weight
        self.bias = _stacked_parameter([layer.bias for layer in layers])
        self.gemm_quant = gemm_quant
        self.op = op
        self.prepad = prepad

    def forward(self, x: Tensor) -> Tensor:
        if self.prepad is not None:
            widths, mode = self.prepad
            x = F.pad(x, widths, mode=mode)
        x = _split(x, self.members)
        quant = self.gemm_quant
        if quant is not None and quant.switch.enabled:
            return _fold(QuantGemm.apply(x, self.weight, self.bias, quant))
        if isinstance(self.op, StackedLinearOp):
            return _fold(QuantGemm.apply(x, self.weight, self.bias, _FP32_GEMM))
        return _fold(PlainStackedConv.apply(x, self.weight, self.bias, self.op))


class PlainStackedConv(torch.autograd.Function):
    """A stacked convolution in fp32, each member's GEMMs as torch's autograd computes a plain
    convolution's alone: the forward, then one `convolution_backward` for the gradients autograd asks
    for, the bias's included (`StackedConvOp.plain_grads`: grouped where a probe finds each member's
    bits, else each member's own call)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, op: StackedConvOp) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.op = op
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_data, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (*ctx.op.plain_grads(dy, x, weight, (need_data, need_weight, need_bias)), None)


class StackedMatmul(nn.Module):
    """`a @ b` for folded operands, each member's operands quantized as its own activations. A
    member's product alone is a batched matmul too (attention's q k^T, p v), which the group's runs
    as one where `sums_as_members` finds it sums as each member's own (in fp32: for the product and the
    two products of its gradient, which torch's autograd computes), else member by member on operands
    at their alignment alone (`at_alone_alignment`; their gradients too: `_fresh_gradient`)."""

    def __init__(self, members: int, gemm_quant: LayerQuant | None) -> None:
        super().__init__()
        self.members = members
        self.gemm_quant = gemm_quant

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        quant = self.gemm_quant
        if quant is None or not quant.switch.enabled:
            split = (_split(a, self.members), _split(b, self.members))
            if sums_as_members("matmul with its gradient", functools.partial(_matmul_with_grads, 1),
                               functools.partial(_matmul_with_grads, 0), split, True):
                return a @ b
            aligned = [at_alone_alignment(t).unbind(0) for t in split]
            return torch.cat([_fresh_gradient(a_g @ b_g) for a_g, b_g in zip(*aligned, strict=True)])
        a, b = _split(a, self.members), _split(b, self.members)
        members = MemberRanks(a.dim() - 1, b.dim() - 1, batched_alone=True)
        return _fold(quant_matmul(a, b, quant, members=members))


class _FreshGradient(torch.autograd.Function):
    """The identity, whose backward hands on its gradient as a fresh tensor: a member's output run
    member by member gets its gradient where it has it alone (a fresh tensor's alignment), not as a
    slice of the group's gradient, for the GEMMs autograd runs on it."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        return dy.clone(memory_format=torch.preserve_format)


def _fresh_gradient(y: Tensor) -> Tensor:
    return _FreshGradient.apply(y) if torch.is_grad_enabled() and y.requires_grad else y


def _matmul_with_grads(start_dim: int, a: Tensor, b: Tensor) -> Tensor:
    """a @ b and the two products of its gradient (dy b^T, a^T dy; the product itself standing in for
    dy), flattened from `start_dim` (1: after the members' axis): what a probe compares for a matmul
    whose gradient torch's autograd computes."""
    y = a @ b
    products = (y, y @ b.transpose(-1, -2), a.transpose(-1, -2) @ y)
    return torch.cat([p.flatten(start_dim) for p in products], dim=start_dim)


class PerMemberLayer(nn.Module):
    """A layer with weights or buffers of its own and no layers inside, run member by member: each
    member's slice of the folded batch through the member's own copy of the layer (its Python
    attributes its own, as alone: `_without_own_tensors`) with that member's own weights and buffers
    (stacked along a leading member axis; buffers a layer updates in place, as BatchNorm's running
    statistics, are updated in the member's slice). Where its input needs a gradient, each torch call
    of the layer reads the input through `_MemberReads`, unless the layer is one of READS_INPUT_ONCE.

    Each member's input, floating-point weights and buffers, and output gradient reach the layer at
    the address alignment they have alone (`at_alone_alignment`, `_JoinedAsAlone`): a user's layer
    may run a GEMM on them (torch.addmm, torch.einsum), and MKL on an AMD EPYC sums a product
    otherwise for an operand off a 16-byte boundary, where member g's slice of a stacked tensor lies
    g x its size in (tests/train/test_train_grouped_align_leaf.py). A copy only where a member's
    block is off; a buffer's copy is written back after the members' calls, and a buffer the layer
    reassigns (`self.average = ...`) is copied into the member's part after its call. A buffer
    registered as None that the members' calls set becomes a stacked buffer of their tensors.

    A layer that may write its parameters in its forward (a user's layer: a max-norm clamp under
    no_grad, or through `.data`; an Embedding with max_norm) gets each member's parameters as fresh
    tensors of its own (`_MemberCopies`; unbind's views may not be modified in place), which are
    copied back into the member's part after its call."""

    def __init__(self, layers: Sequence[nn.Module], members: int) -> None:
        super().__init__()
        self.members = members
        template = layers[0]
        for name in template._parameters:
            self.register_parameter(name, _stacked_parameter([layer._parameters[name] for layer in layers]))
        for name, b in template._buffers.items():
            parts = [layer._buffers[name] for layer in layers]
            stacked = None if b is None else torch.stack([t for t in parts if t is not None])
            self.register_buffer(name, stacked, persistent=name not in template._non_persistent_buffers_set)
        self.__dict__["template"] = template  # not a submodule, nor called: the settings callers read
        self.__dict__["member_layers"] = [_without_own_tensors(layer) for layer in layers]
        self.__dict__["reads_input_once"] = type(template) in READS_INPUT_ONCE
        self.__dict__["writes_parameters"] = _may_write_parameters(template)

    def __getattr__(self, name: str) -> Any:
        """The first member's settings and attributes (a LayerNorm's eps), which callers may read."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "member_layers" not in self.__dict__:
                raise
            return getattr(self.__dict__["member_layers"][0], name)

    def forward(self, *inputs: Tensor) -> Any:
        layers: list[nn.Module] = self.__dict__["member_layers"]
        parameters = {n: p for n, p in self._parameters.items() if p is not None}
        buffers = {n: b for n, b in self._buffers.items() if b is not None}
        unset = [n for n, b in self._buffers.items() if b is None]
        written = parameters if self.__dict__["writes_parameters"] else {}
        aligned = {name: _at_alone_alignment_for_blas(tensor)
                   for name, tensor in {**parameters, **buffers}.items() if name not in written}
        slices: dict[str, Sequence[Tensor]] = {name: tensor.unbind(0) for name, tensor in aligned.items()}
        slices.update(self._member_copies(written))
        buffer_slices = {name: slices[name] for name in buffers}
        template = self.__dict__["template"]
        axes = _member_axes(template, inputs)
        if not self.__dict__["reads_input_once"] and any(not isinstance(x, Tensor) for x in inputs):
            raise TypeError(f"{type(template).__name__} takes a tuple of tensors, whose reads a group cannot "
                            f"take apart member by member")  # (`_MemberReads` takes a tensor's reads)
        tracked = torch.is_grad_enabled() and any(x.requires_grad for x in _tensors(inputs, {}))
        reads = (None if self.__dict__["reads_input_once"] or not tracked
                 else _MemberReads(inputs, self.members, axes))
        split = [_member_blocks(x, self.members, aligned=reads is None, axis=axis)
                 for x, axis in zip(inputs, axes, strict=True)]
        outputs = []
        set_buffers: dict[str, list[Tensor | None]] = {name: [] for name in unset}
        try:
            for g, layer in enumerate(layers):
                if layer.training != self.training:
                    layer.training = self.training
                for name, parts in slices.items():
                    table = layer._parameters if name in layer._parameters else layer._buffers
                    table[name] = parts[g]  # type: ignore[assignment]  # a slice stands in for one call
                for name in unset:
                    layer._buffers[name] = None
                _refresh(layer)
                member_inputs = [x[g] for x in split]
                if reads is None:
                    outputs.append(layer(*member_inputs))
                else:
                    with reads.of_member(g, member_inputs):
                        outputs.append(layer(*member_inputs))
                _keep_reassigned_buffers(layer, buffer_slices, g)
                if written:
                    _write_back(written, slices, g)
                for name in unset:
                    set_buffers[name].append(layer._buffers.get(name))
        finally:  # (each member's layer keeps its slices: a block it checkpoints, recomputed in the
            # backward, reads them)
            for name, buffer in buffers.items():  # what the members wrote into aligned copies
                if aligned[name] is not buffer:
                    buffer.copy_(aligned[name])
        for name, members_buffers in set_buffers.items():
            self._buffers[name] = _stacked_set_buffer(layers[0], name, members_buffers)
        if written:
            self.__dict__["copies"] = (_versions(written), torch.is_grad_enabled(),
                                       {name: slices[name] for name in written})
        rows = inputs[0].shape[axes[0]] // self.members if inputs and isinstance(inputs[0], Tensor) else 0
        if isinstance(template, nn.RNNBase):
            return _cat_members(outputs, rows, state_axis=RECURRENT_STATE_BATCH_AXIS, output_axis=axes[0])
        return _cat_members(outputs, rows)

    def _member_copies(self, written: Mapping[str, Tensor]) -> dict[str, Sequence[Tensor]]:
        """Each member's copies of the parameters the layer may write: those of its earlier call in
        this forward of the group (a layer called twice, weight sharing) while the stacked parameters
        are as that call left them, as alone every call takes the one tensor (what a later call
        writes reaches what an earlier one saved, and its in-place write fails that one's backward
        as alone); otherwise fresh ones."""
        if not written:
            return {}
        held = self.__dict__.get("copies")
        if held is not None and held[0] == _versions(written) and held[1] == torch.is_grad_enabled():
            return dict(held[2])
        return {name: _MemberCopies.apply(tensor) for name, tensor in written.items()}

    def forget_copies(self) -> None:
        """Drops the members' parameter copies (`_member_copies`): a new forward of the group."""
        self.__dict__["copies"] = None

    def __getstate__(self) -> dict[str, Any]:
        """What a deepcopy, pickle or torch.save takes: each member's layer without the tensors a
        forward left in it (slices of the stacked tensors, views in autograd's graph, which deepcopy
        cannot copy and pickle would store again) and without the members' parameter copies; the
        copy's next forward puts its own there."""
        state: dict[str, Any] = super().__getstate__()
        state["member_layers"] = [_without_slices(layer) for layer in state["member_layers"]]
        state["copies"] = None
        return state


def _without_slices(layer: nn.Module) -> nn.Module:
    """A shallow copy of a member's layer (no layers inside) with None where its parameters and buffers
    are: what `_without_own_tensors` made, before a forward put the member's slices there."""
    empty = copy.copy(layer)
    empty.__dict__["_parameters"] = dict.fromkeys(layer._parameters)
    empty.__dict__["_buffers"] = dict.fromkeys(layer._buffers)
    return empty


def _without_own_tensors(layer: nn.Module) -> nn.Module:
    """A copy of a member's layer with its own tensors left out (None until a call puts the member's
    slices there, which it keeps until the next: a block it checkpoints, recomputed in the backward,
    reads them) and everything else its own: the Python attributes its forward may write (a step
    counter, a running float, a list it appends to), which alone are the member's."""
    own = [*layer._parameters.values(), *layer._buffers.values()]
    return copy.deepcopy(layer, memo={id(t): None for t in own if t is not None})


def _versions(tensors: Mapping[str, Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors.values())


@torch.no_grad()
def _write_back(written: Mapping[str, Tensor], copies: Mapping[str, Sequence[Tensor]], member: int) -> None:
    """What a member's call left in its copies of the stacked parameters (`written`), into its part."""
    for name, stacked in written.items():
        stacked[member].copy_(copies[name][member])


def _may_write_parameters(layer: nn.Module) -> bool:
    """Whether the layer's forward may write its own parameters in place: a user's layer may (a max-norm
    clamp), and so does an Embedding with max_norm; torch's and dse's other layers do not."""
    if isinstance(layer, nn.Embedding):
        return layer.max_norm is not None
    return not type(layer).__module__.startswith(("torch.", OWN_PACKAGE))


class MemberStateUnstacked(ValueError):
    """Found while a group trained: a layer run member by member left its members' buffers in shapes,
    dtypes or None-ness that one stacked tensor cannot hold (a buffer its forward sets from None in
    some members only), or a module run once for all members wrote a Python attribute its first
    forward did not (`StackedModel._shared_state_guarded`); the group's trials train one by one instead."""


def _stacked_set_buffer(template: nn.Module, name: str, parts: Sequence[Tensor | None]) -> Tensor | None:
    """A buffer registered as None, as the members' calls left it: still None, or each member's
    tensor stacked along the members' axis (then an ordinary stacked buffer of the layer)."""
    if all(part is None for part in parts):
        return None
    first = parts[0]
    if first is None or any(part is None or part.shape != first.shape or part.dtype != first.dtype
                            for part in parts):
        raise MemberStateUnstacked(f"cannot group {type(template).__name__}: its forward sets buffer "
                                   f"{name!r} to tensors of other shapes or dtypes, or to None, in "
                                   f"different members")
    return torch.stack(cast(list[Tensor], list(parts)))


class _MemberCopies(torch.autograd.Function):
    """Each member's block of a stacked parameter as a fresh tensor of its own (at the alignment a
    parameter has alone), which the layer may modify in place, as unbind's views may not be; the
    backward stacks the members' gradients, as unbind's does."""

    @staticmethod
    def forward(ctx: Any, stacked: Tensor) -> tuple[Tensor, ...]:
        return tuple(block.clone(memory_format=torch.contiguous_format) for block in stacked.unbind(0))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Tensor:
        return torch.stack(grads)


def _keep_reassigned_buffers(template: nn.Module, slices: Mapping[str, Sequence[Tensor]],
                             member: int) -> None:
    """A buffer the layer's call reassigned (`self.running = 0.9 * self.running + ...`, where
    BatchNorm updates in place) copied into the member's part (`slices`: each buffer's members'
    parts): the next call's swap would drop it."""
    for name, parts in slices.items():
        new = template._buffers.get(name)
        if new is parts[member]:
            continue
        if new is None or new.shape != parts[member].shape or new.dtype != parts[member].dtype:
            raise MemberStateUnstacked(f"cannot group {type(template).__name__}: its forward reassigns "
                                       f"buffer {name!r} to another shape or dtype than it had")
        with torch.no_grad():
            parts[member].copy_(new)


READS_INPUT_ONCE: frozenset[type[nn.Module]] = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.GRU, nn.LSTM, nn.RNN,
    PositionEmbedding,
})
"""Layers whose forward reads its input in one torch call (the built-in proxies' layers run member by
member among them): their members need no `_MemberReads`, whose handler costs about 20 us a torch
call (a BatchNorm group's forward took 2x its time under it). A subclass is not one of them."""

_METADATA = frozenset({Tensor.size, Tensor.dim, Tensor.numel, Tensor.stride, Tensor.is_contiguous,
                       Tensor.data_ptr, Tensor.element_size, Tensor.is_floating_point, Tensor.is_complex})
_VIEW_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
"""The tensor properties that read the tensor (views, whose gradient reaches it); the others (shape,
dtype, grad, data, ...) are metadata."""


class _MemberReads(TorchFunctionMode):
    """Each torch call inside a layer run member by member that reads a member's input reads it as a
    slice of its own of the folded input, so that its gradient reaches the folded input as its own
    term, as it does alone.

    Alone, autograd adds the gradient terms of a tensor read several times into one buffer, one term
    at a time, in the order its nodes run (by descending sequence number: the residual's add after
    the layer first, then the layer's reads from last to first, the ops before the layer last). Had
    the member's input one slice for the whole layer, the layer's terms would be summed in that
    slice's buffer first and reach the folded input as one: (r + (t2 + t1)) where alone it is
    ((r + t2) + t1), which differs in the last bit (a residual around the layer's input). Here the
    n-th read of every member takes member g's part of the n-th unbind of the folded input: each
    unbind gets one term a member, its stack reaches the folded input as one term, and the unbinds
    run in the order of the reads they serve, as the reads' own nodes do alone. Within one call that
    reads the input more than once (x * x), the call's slices are made last to first, as autograd
    adds a node's terms for one tensor in the order of its inputs."""

    def __init__(self, inputs: Sequence[Tensor], members: int, axes: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.members = members
        self.axes = [0] * len(inputs) if axes is None else axes
        """The axis holding each input's samples (`_member_axes`: the first but for a recurrent layer)."""
        self.unbinds: list[list[Sequence[Tensor]]] = [[] for _ in inputs]
        """For each input, its n-th read's unbind of the folded input along the member axis."""
        self.member = 0
        self.placeholders: dict[int, int] = {}
        self.counts: list[int] = []

    @contextlib.contextmanager
    def of_member(self, member: int, placeholders: Sequence[Tensor]) -> Iterator[None]:
        """The mode over member `member`'s call, whose inputs are `placeholders`."""
        self.member = member
        self.placeholders = {id(t): i for i, t in enumerate(placeholders)}
        self.counts = [0] * len(placeholders)
        with self:
            yield

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA or (getattr(func, "__name__", None) == "__get__"
                                 and getattr(getattr(func, "__self__", None), "__name__", None)
                                 not in _VIEW_PROPERTIES):
            return func(*args, **kwargs)
        reads = [i for t in _tensors(args, kwargs) if (i := self.placeholders.get(id(t))) is not None]
        if not reads:
            return func(*args, **kwargs)
        if func in INNER_SUM_FUNCTIONS and torch.is_grad_enabled():
            joined = a_term_per_use(func, args, kwargs, self._reads)
            if joined is not NotImplemented:
                return joined
        self._new_reads(reads)
        args = tuple(self._read(value) for value in args)
        kwargs = {name: self._read(value) for name, value in kwargs.items()}
        return func(*args, **kwargs)

    def _new_reads(self, reads: Sequence[int]) -> None:
        """Unbinds for a call's new reads of the inputs (their indices, once per read), last to first."""
        for i, unbinds in enumerate(self.unbinds):
            last = self.counts[i] + reads.count(i)
            unbinds.extend([()] * (last - len(unbinds)))
            for n in reversed(range(self.counts[i], last)):
                if not unbinds[n]:
                    unbinds[n] = _member_blocks(self.inputs[i], self.members, read=True, axis=self.axes[i])

    def _reads(self, t: Tensor, uses: int) -> list[Tensor]:
        """`uses` reads of t (a placeholder: each the member's slice of an unbind of its own, the first
        made last; else t itself) for a call that uses t `uses` times."""
        i = self.placeholders.get(id(t))
        if i is None:
            return [t] * uses
        self._new_reads([i] * uses)
        return [self._read(t) for _ in range(uses)]

    def _read(self, value: Any) -> Any:
        """`value` (an argument: a tensor, or a list or tuple of them) with each placeholder read as
        the member's slice of its next unbind."""
        if isinstance(value, Tensor):
            i = self.placeholders.get(id(value))
            if i is None:
                return value
            self.counts[i] += 1
            return self.unbinds[i][self.counts[i] - 1][self.member]
        if isinstance(value, list | tuple) and any(isinstance(t, Tensor) for t in value):
            parts = [self._read(t) for t in value]
            return parts if isinstance(value, list) else tuple(parts)
        return value


def _member_blocks(x: Tensor | tuple[Tensor, ...], members: int, aligned: bool = True, read: bool = False,
                   axis: Any = 0) -> Sequence[Any]:
    """The members' slices of a folded input (its samples along `axis`), each at the address
    alignment it has alone for a BLAS (`_at_alone_alignment_for_blas`; `aligned` False: the slices as
    they are, placeholders whose reads `_MemberReads` takes aligned), in the strides it has alone
    where the axis is not the first (`at_alone_alignment`). Where the input needs a gradient and is
    a user's layer's `read`, or is not contiguous, the members' gradients join in the layouts they
    have (`_UnbindAsAlone`); elsewhere (torch's own layers on a contiguous input, which hand back a
    contiguous gradient: the built-in proxies') as torch.stack joins them, at no extra cost. A tuple
    (an LSTM's initial state (h0, c0)) gives each member a tuple of its slices."""
    if isinstance(x, tuple):
        if type(x) is not tuple:  # (a PackedSequence: a tuple of another meaning)
            raise TypeError(f"a {type(x).__name__} input is none a group can split member by member")
        axes = axis if isinstance(axis, tuple) else (axis,) * len(x)
        return list(zip(*(_member_blocks(t, members, aligned, read, a) for t, a in zip(x, axes, strict=True)),
                        strict=True))
    split = _split(x, members) if axis == 0 else x.unflatten(axis, (members, -1)).movedim(axis, 0)
    if not aligned:
        return split.unbind(0)
    if (read or not x.is_contiguous()) and torch.is_grad_enabled() and x.requires_grad \
            and x.is_floating_point():
        return _UnbindAsAlone.apply(split, axis)
    return _at_alone_alignment_for_blas(split).unbind(0)


def _member_axes(layer: nn.Module, inputs: Sequence[Any]) -> list[Any]:
    """The axis that holds the members' samples in each of a layer's inputs (a tuple of them for a
    tuple): the first, but a recurrent layer's (nn.RNNBase) batched sequence-first input
    (batch_first=False) holds them on its second, and so does its initial state (h0, an LSTM's
    (h0, c0); (layers x directions, B, hidden) alone) where it was made for the folded batch, whose
    G x B samples it then holds there (RECURRENT_STATE_BATCH_AXIS); a state the members' own calls
    made (a layer run member by member, whose outputs join along their first axis: (G x layers x
    directions, B, hidden)) holds them on its first."""
    first = inputs[0] if inputs else None
    if not isinstance(layer, nn.RNNBase) or not isinstance(first, Tensor) or first.dim() != 3:
        return [0] * len(inputs)
    along = 0 if layer.batch_first else 1
    folded = first.shape[along]

    def state_axis(t: Any) -> Any:
        if isinstance(t, tuple):
            return tuple(state_axis(part) for part in t)
        return RECURRENT_STATE_BATCH_AXIS if t.dim() == 3 and t.shape[1] == folded else 0

    return [along, *(state_axis(t) for t in inputs[1:])]


class _UnbindAsAlone(torch.autograd.Function):
    """The members' blocks (`at_alone_alignment`), unbound; the backward joins the members' gradients
    in the layout each has (`cat_as_alone`), where unbind's (torch.stack) and an aligning copy's (a
    copy into a view: autograd's CopySlices) would make it contiguous. A user's layer hands its
    input the gradient in the layout its backward gives (torch.addmm's for a batch-innermost input:
    batch-innermost), and the layer before sums it in that layout's order alone: a weight of its own
    scaling a batch-innermost output (`BatchInnerScale`) before a torch.addmm layer got another
    weight gradient in a group than alone, G = 2 and 3, batch 7, 13 and 50, fp32."""

    @staticmethod
    def forward(ctx: Any, split: Tensor, axis: int) -> tuple[Tensor, ...]:
        ctx.shape, ctx.axis = split.shape, axis
        return tuple(block.view_as(block) for block in at_alone_alignment(split).unbind(0))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        joined = cat_as_alone(list(grads), ctx.axis)
        if ctx.axis == 0:
            return joined.reshape(ctx.shape), None
        return joined.unflatten(ctx.axis, (ctx.shape[0], -1)).movedim(ctx.axis, 0), None


def _at_alone_alignment_for_blas(t: Tensor) -> Tensor:
    """`at_alone_alignment(t)` for a floating-point t (a copy only where a member's block starts off
    alone's alignment), t itself otherwise: a BLAS takes floating-point operands only (an integer
    product runs torch's own loop, an index tensor no product at all), so BatchNorm's step counter
    and an Embedding's token indices stay as they are."""
    return at_alone_alignment(t) if t.is_floating_point() else t


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """The tensors a torch call takes: arguments, and the elements of list or tuple arguments."""
    found: list[Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(t for t in value if isinstance(t, Tensor))
    return found


def _refresh(layer: nn.Module) -> None:
    """A recurrent layer (nn.GRU, nn.LSTM, nn.RNN) reads its weights from a list it builds from its
    parameters: rebuilt after they were swapped."""
    if isinstance(layer, nn.RNNBase):
        layer._init_flat_weights()


RECURRENT_STATE_BATCH_AXIS = 1
"""The batch axis of an nn.RNNBase's final state (h_n, and an LSTM's c_n): (layers x directions, B,
hidden) whether or not the layer is batch_first."""


def _cat_members(outputs: Sequence[Any], rows: int, in_tuple: bool = False, state_axis: int | None = None,
                 output_axis: int | None = None) -> Any:
    """The members' outputs of a layer run member by member as one folded output: a tensor along its
    first axis; a tuple (a recurrent layer's (output, state)) element by element, where a tensor
    whose first axis is not the member's batch of `rows` goes along its first axis that is. A
    recurrent layer (nn.RNNBase) says where: its output along `output_axis` (the second where
    batch_first=False), its batched state (the tuple's elements after the first: h_n, an LSTM's
    (h_n, c_n)) along `state_axis`, whatever their sizes (a 2-layer LSTM's h_n on 2 samples is
    (2, 2, hidden)). Where a gradient flows, a member's block of it reaches the member's call at its
    alignment and in its strides alone (`_JoinedAsAlone`)."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_cat_members([out[i] for out in outputs], rows, True, state_axis,
                                  state_axis if i or in_tuple else output_axis) for i in range(len(first)))
    if not isinstance(first, Tensor) or first.dim() == 0:
        return first
    axis = 0
    if output_axis is not None and state_axis is not None and first.dim() == 3:
        axis = output_axis
    elif in_tuple and first.shape[0] != rows:
        axis = next((a for a in range(first.dim()) if first.shape[a] == rows), 0)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in outputs)
    if axis != 0:
        return _JoinedAsAlone.apply(axis, *outputs) if tracked else torch.cat(list(outputs), axis)
    if tracked and not (
            first.is_contiguous() and first.numel() * first.element_size() % alignment_bytes(first) == 0):
        return _JoinedAsAlone.apply(0, *outputs)
    return cat_as_alone(list(outputs))  # (a contiguous output whose member blocks are aligned: its
    # gradient, laid out as it is, is aligned too - the built-in proxies' layers, at no extra cost)


class _JoinedAsAlone(torch.autograd.Function):
    """`cat_as_alone` of the members' outputs along `axis`, whose backward hands each member its block
    of the group's gradient at the address alignment and in the strides it has alone
    (`at_alone_alignment`: a copy only where a member's block starts off it, or where the axis is not
    the first), as torch.cat's backward would not: member g's block lies g x its size into the
    group's gradient, and the layer's own backward may run a GEMM on it."""

    @staticmethod
    def forward(ctx: Any, axis: int, *parts: Tensor) -> Tensor:
        ctx.members, ctx.axis = len(parts), axis
        joined = cat_as_alone(list(parts), axis)  # a view of its own join where not contiguous: a copy
        # in the same strides, as autograd forbids modifying a custom Function's view output in place
        return joined if joined._base is None else joined.clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        split = dy.unflatten(ctx.axis, (ctx.members, -1)).movedim(ctx.axis, 0)
        return (None, *at_alone_alignment(split).unbind(0))


# --- building the stacked network -----------------------------------------------------------------


def _conv_op(module: nn.Conv1d | nn.Conv2d) -> StackedConvOp:
    padding, _ = conv_geometry(module)
    return StackedConvOp(ConvOp(tuple(module.stride), padding, tuple(module.dilation), module.groups))


def _gemm_quant(op: StackedLinearOp | StackedConvOp | None, policy: QuantPolicy, switch: QuantSwitch,
                generators: MemberGenerators | None) -> LayerQuant | None:
    """The members' quantizers of one GEMM layer (None: it stays fp32), as `gemm_quant` builds each
    member's alone (op None: a Matmul, whose operands are both activations)."""
    if not policy.quantizes_gemms:
        return None
    quants = [policy.activations, policy.weights, policy.gradients, policy.weight_grads]
    if isinstance(op, StackedConvOp):
        quants = [_on_axis(q, 1) for q in quants]
    activations, weights, gradients, weight_grads = (_members(q, generators) for q in quants)
    accumulator = _accumulator(policy.accumulation, policy.accumulation_chunk, generators)
    if op is None:
        return LayerQuant(None, activations, None, gradients, None, switch, accumulator)
    master = policy.master_weights if policy.master_weights.enabled else None
    return LayerQuant(op, activations, weights, gradients, weight_grads, switch, accumulator, master)


def _stacked_layer(layers: list[nn.Module], policy: QuantPolicy | None, switch: QuantSwitch,
                   generators: MemberGenerators | None) -> nn.Module:
    first = layers[0]
    members = len(layers)
    op: StackedLinearOp | StackedConvOp | None = None
    if isinstance(first, nn.Linear):
        op = _STACKED_LINEAR
    elif isinstance(first, nn.Conv1d | nn.Conv2d):
        op = _conv_op(first)
    quant = None if policy is None else _gemm_quant(op, policy, switch, generators)
    if op is None:
        return StackedMatmul(members, quant)
    prepad = conv_geometry(first)[1] if isinstance(op, StackedConvOp) else None
    return StackedGemmLayer(layers, members, quant, op, prepad)


def _stack_in_place(module: nn.Module, layers: Sequence[nn.Module], names: list[str]) -> None:
    """The module's tensors `names` (GEMM operands) become the members' stacked tensors; the module
    itself runs once on the folded batch."""
    for name in names:
        if name in module._parameters:
            module._parameters[name] = _stacked_parameter([layer._parameters[name] for layer in layers])
        else:
            module._buffers[name] = torch.stack([t for layer in layers
                                                 if (t := layer._buffers[name]) is not None])


def stack_models(models: Sequence[nn.Module], policy: QuantPolicy | None, switch: QuantSwitch,
                 generators: MemberGenerators | None, example: Tensor | None = None) -> StackedModel:
    """One stacked network from G networks of one architecture (each member's own initial weights),
    quantized as `quantize_model` quantizes each of them under `policy` (None: fp32), full-precision
    layers included and each GEMM left fp32 named in its warning, with each member's stochastic rounding
    drawn from its own generator. `example`
    (the training samples `dse.train.loop.train` shows quantize_model) finds the GEMMs the forward
    calls as functions, which run per member under dse/train/stacked_functional.py."""
    from dse.train.functional import install
    from dse.train.stacked_functional import StackedFunctionalGemms

    first = models[0]
    found = _gemms(first, example)
    reason = structure_reason(first, found)
    if reason is not None:
        raise ValueError(f"cannot stack this model: {reason}")
    policies = None if policy is None else layer_policies(policy, found)
    for message in found.unconverted if policy is not None else ():  # as quantize_model warns alone
        warnings.warn(message, UnconvertedGemmWarning, stacklevel=2)
    module_layers = {site.layer.name: site.layer for site in found.sites if site.module is not None}
    net = copy.deepcopy(first)
    by_name = [dict(model.named_modules(remove_duplicate=False)) for model in models]
    stacked: dict[int, nn.Module] = {}  # by the copy's module: a layer applied twice stays one layer
    places: list[tuple[str, nn.Module]] = []
    in_place: set[int] = set()
    for name, module in net.named_modules(remove_duplicate=False):
        layers = [modules[name] for modules in by_name]
        operands = _operand_tensors(name, module, found)
        if id(module) in stacked or id(module) in in_place:
            pass
        elif type(module) in GEMM_LAYER_TYPES and name:
            policy_of = None if policies is None else policies.of(module_layers[name])
            stacked[id(module)] = _stacked_layer(layers, policy_of, switch, generators)
        elif operands:
            _stack_in_place(module, layers, operands)
            in_place.add(id(module))
        elif _holds_state(module) and name:
            stacked[id(module)] = PerMemberLayer(layers, len(models))
        if id(module) in stacked:
            places.append((name, stacked[id(module)]))
    for name, layer in places:
        parent_name, _, attribute = name.rpartition(".")
        net.get_submodule(parent_name)._modules[attribute] = layer
    if not places and not in_place and _holds_state(net):  # the model itself is one leaf layer
        net = PerMemberLayer(list(models), len(models))
    if any(site.module is None for site in found.sites):
        tensors = {**dict(net.named_buffers()), **dict(net.named_parameters())}
        members = {id(tensors[name]) for name in found.operands if name in tensors}
        install(net, found, StackedFunctionalGemms(net, policies, switch, generators, len(models), members))
    return StackedModel(net, len(models))


def attributes_apart(net: nn.Module, models: Sequence[nn.Module]) -> str | None:
    """Which module a group's network `net` (a StackedModel's or a NITI group's) runs once for all its
    members (a user's, not one run member by member) holds Python attributes of data (`plain_data`: a
    number or tensor drawn at construction, a random generator seeded per trial) in which its members
    (`models`, as stacked) differ: the group would give every member the first's (None: none). The
    forward check (`stack_reason`) stacks copies of one network, whose attributes agree."""
    by_name = [dict(model.named_modules(remove_duplicate=False)) for model in models]
    for name, module in net.named_modules():
        if type(module).__module__.startswith((OWN_PACKAGE, "torch.")):
            continue
        apart = [attribute for attribute, value in vars(module).items()
                 if attribute not in MODULE_INTERNALS and plain_data(value)
                 and any(name not in modules or not same_attribute(by_name[0][name], modules[name], attribute)
                         for modules in by_name[1:])]
        if apart:
            return (f"its {type(module).__name__} {name or '(the model)'} holds {', '.join(apart)}, which "
                    f"differs between the group's trials as it stacks them (a value drawn or seeded per "
                    f"trial), and a group runs it once for all "
                    f"its members with the first trial's")
    return None


class StackedModel(nn.Module):
    """The stacked network: inputs (G, B, ...) in, outputs (G, B, ...) out, the batch folded inside."""

    def __init__(self, net: nn.Module, members: int) -> None:
        super().__init__()
        self.net = net
        self.members = members
        self.member_kernels = (MemberKernels(net, members, (StackedGemmLayer, StackedMatmul))
                               if may_call_position_dependent(net) else None)
        """`MemberKernelMode` over the net's forward where it may call a function that mode runs
        member by member (a user's module; the built-in proxies call none, and a mode costs about a
        microsecond per torch call outside our own layers)."""
        self.__dict__["writing_layers"] = [m for m in net.modules()
                                           if isinstance(m, PerMemberLayer) and m.writes_parameters]
        """Layers whose members' parameter copies last one forward (`PerMemberLayer._member_copies`)."""
        self.__dict__["shared_state"] = SharedStateGuard(net, self.member_kernels)

    @property
    def position_dependent_kernels(self) -> bool:
        return self.member_kernels is not None

    def forward(self, x: Tensor) -> Tensor:
        layers: list[PerMemberLayer] = self.__dict__["writing_layers"]
        for layer in layers:
            layer.forget_copies()
        try:
            with self._shared_state_guarded():
                if self.member_kernels is None:
                    return _split(self.net(_fold(x)), self.members)
                with self.member_kernels.interrupt_safe():
                    return _split(self.net(_fold(x)), self.members)
        finally:
            for layer in layers:
                layer.forget_copies()

    def _shared_state_guarded(self) -> contextlib.AbstractContextManager[None]:
        return cast(SharedStateGuard, self.__dict__["shared_state"]).watching()


class SharedStateGuard:
    """Watches a group's forwards for state that a module it runs once for all its members (a user's
    network: `modules`) keeps, where each member alone keeps its own (`watching`)."""

    def __init__(self, net: nn.Module, member_kernels: MemberKernels | None) -> None:
        self.modules = [(name, m) for name, m in net.named_modules()
                        if not type(m).__module__.startswith((OWN_PACKAGE, "torch."))]
        """A user's modules the group runs once for all its members."""
        self.member_kernels = member_kernels
        self.first_written: list[set[str]] | None = None
        """The attributes each of `modules` wrote in the group's first forward."""
        self.forwards = 0
        """The group's forwards so far, training and evaluation (what a MemberStateUnstacked drops)."""

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """A forward after which a module run once for all members (a user's network) has written a
        Python attribute its first forward did not write raises MemberStateUnstacked: the group shares
        what each member alone keeps its own (a running float updated from the second step on), and
        the forward check (`stack_reason`), one forward long, judged only the first forward's writes.
        So does a later forward that writes a tensor attribute (of any dtype), or reads a value of the
        group's tensors into Python outside our own layers (`MemberKernelMode.read`): what it keeps
        the names cannot tell (a value first written the same in every member, then from its batch)."""
        modules = self.modules
        before = [Attributes(m) for _, m in modules]
        yield
        self.forwards += 1
        written = [set(kept.changed()) for kept in before]
        first = self.first_written
        if first is None:
            self.first_written = written
            return
        for (name, m), now, then in zip(modules, written, first, strict=True):
            if now - then:
                raise MemberStateUnstacked(
                    f"its {type(m).__name__} {name or '(the model)'} writes {', '.join(sorted(now - then))} "
                    f"in a later forward than its first (forward {self.forwards}), and a group "
                    f"runs it once for all its members, who would share that state (alone each trial keeps "
                    f"its own)")
        for (name, m), now in zip(modules, written, strict=True):
            tensors = [a for a in sorted(now) if _holds_tensor(vars(m).get(a))]
            if tensors:
                raise MemberStateUnstacked(
                    f"its {type(m).__name__} {name or '(the model)'} writes tensors in "
                    f"{', '.join(tensors)} in a later forward than its first (forward "
                    f"{self.forwards}), and a group runs it once for all its members, who would "
                    f"share it where it comes from their batch (alone each trial keeps its own)")
        read = None if self.member_kernels is None else self.member_kernels.mode.read
        if read is not None:
            raise MemberStateUnstacked(
                f"a later forward than its first (forward {self.forwards}) reads a value of the "
                f"group's tensors into Python ({read}) in a module the group runs once for all its members: "
                f"alone each trial reads its own, and what the module keeps of it (an attribute first "
                f"written the same in every member) would be shared")


def _holds_tensor(value: Any) -> bool:
    """Whether an attribute's value is a tensor of any dtype or holds one at any depth (`held`): a value
    a forward may have computed from its batch without reading it (a mean, a count of positive units)."""
    return any(isinstance(item, Tensor) for item in held(value))


def stored_weights(model: nn.Module) -> list[tuple[Tensor, TensorQuant]]:
    """The stacked weights that live in a format between steps, with it, in the order
    `dse.train.layers.stored_weights` gives each member's alone (GEMM layers, then functional GEMMs)."""
    from dse.train.functional import functional_gemms

    out: dict[int, tuple[Tensor, TensorQuant]] = {}
    for m in model.modules():
        storage = m.gemm_quant.master_weights if isinstance(m, StackedGemmLayer) and m.gemm_quant else None
        if storage is not None:
            out[id(m.weight)] = (cast(Tensor, m.weight), storage)
    for module in model.modules():
        gemms = functional_gemms(module)
        if gemms is not None:
            for weight, storage in gemms.stored_weights():
                out.setdefault(id(weight), (weight, storage))
    return list(out.values())
