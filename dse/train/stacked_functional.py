"""The GEMMs a stacked network's forward calls as functions (dse/train/functional.py), per member.

In a stacked network (dse/train/stacked.py) the tensors a functional GEMM takes from the model - the
weight of `F.linear(x, self.proj.weight)`, `x @ self.w`, `F.conv2d(x, self.w)`, nn.MultiheadAttention's
in- and out-projections - are stacked along a leading member axis (member tensors), and its other
operands carry the members' batches folded into their first axis (sample g*B + i is member g's i-th;
attention's heads fold after it, (G*B*H, L, d), and nn.MultiheadAttention's sequence-first tensors
fold the batch on their second axis). The same torch-function mode sees each GEMM call and runs it
for all members at once, on member-stacked operands of shape (G, *the member's own shape):

- F.linear and MultiheadAttention's projections: `StackedLinearOp` (batched GEMMs), as a stacked Linear;
- F.conv1d/2d: the operands quantized for all members, each convolution product one grouped
  convolution where a probe finds it each member's own, else member by member (`StackedConvOp`), as a
  stacked convolution;
- matmul / mm / bmm / `@` (and attention's scores and context): one batched matmul through
  `QuantMatmulFn` with a member-stacked weight viewed with singleton axes, so that each member
  broadcasts over its own batch exactly as its weight does alone.

Each GEMM takes its members' quantizers (`quantize_members`: a scale per member, stochastic rounding
from each member's `MemberGenerators` stream) and accumulators, from its layer's policy, as the
stacked module layers do. While quantization is switched off (fp32 warm-up), F.scaled_dot_product_attention
and F.multi_head_attention_forward run torch's own kernels member by member, as each member alone does.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.formats.base import MemberGenerators
from dse.train.batched_sums import at_alone_alignment
from dse.train.functional import FunctionalGemms, dispatch, views_of_one, writes_in_place
from dse.train.layers import (
    BlockQuantizer,
    ConvOp,
    LayerQuant,
    LinearOp,
    MemberRanks,
    QuantGemm,
    Quantizer,
    QuantMatmulFn,
    QuantSwitch,
)
from dse.train.policy import QuantPolicy
from dse.train.stacked import (
    _FP32_GEMM,
    _STACKED_LINEAR,
    PerMemberLayer,
    PlainStackedConv,
    StackedConvOp,
    StackedGemmLayer,
    StackedMatmul,
    _fresh_gradient,
    _gemm_quant,
)


class StackingError(ValueError):
    """A functional GEMM whose operands a stacked network cannot take apart per member."""


_MHA_PARAMETERS = list(inspect.signature(F.multi_head_attention_forward).parameters)
_SDPA_PARAMETERS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]


class StackedFunctionalGemms(FunctionalGemms):
    """The functional GEMMs of a stacked network of `members` members: `member_tensors` (by id) are
    the stacked parameters and buffers they take; `generators` the members' rounding streams."""

    def __init__(self, model: nn.Module, policies: Any, switch: QuantSwitch,
                 generators: MemberGenerators | None, members: int, member_tensors: set[int]) -> None:
        super().__init__(model, policies, switch, None)
        self.members = members
        self.member_generators = generators
        self.member_tensors = dict.fromkeys(member_tensors)

    BY_ID = (*FunctionalGemms.BY_ID, "member_tensors")

    def passthrough(self) -> bool:
        module = self.frame().module
        return isinstance(module, (StackedGemmLayer, StackedMatmul, PerMemberLayer)) or super().passthrough()

    def gemm_op(self, op: LinearOp | ConvOp | None) -> Any:
        if isinstance(op, LinearOp):
            return _STACKED_LINEAR
        return StackedConvOp(op) if isinstance(op, ConvOp) else None

    def build_quant(self, op: Any, policy: QuantPolicy) -> LayerQuant:
        quant = _gemm_quant(op or _STACKED_LINEAR, policy, self.switch, self.member_generators)
        assert quant is not None
        return quant if op is not None else dataclasses.replace(quant, op=None)

    def other_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call on a member tensor (or its `.data`, or a view of one) made member by member where on
        the stacked tensor it would take the member axis for the tensor's own: a view that takes no
        other tensor (`views_of_one`: `w.t()`, `w[:k]`, `w.chunk(3)`) as each member's view of its own
        block (`torch.vmap`: a view of the stacked tensor with the member axis first, each member's
        part laid out as its view alone); a write in place that takes no other tensor
        (`writes_in_place`: a max-norm `renorm_` of a GEMM's weight under no_grad) on a fresh copy of
        each member's block (laid out and aligned as its tensor alone), written back. A write autograd
        refuses (a leaf that needs a gradient, outside no_grad) fails as alone. Inside our own layers
        (`passthrough`) every call runs as it is."""
        target = args[0] if args else None
        if not isinstance(target, Tensor) or self.passthrough():
            return func(*args, **kwargs)
        owner = self.data_of(target)
        owner = target if owner is None else owner
        owner = owner if owner._base is None else owner._base
        if id(owner) not in self.member_tensors:
            return func(*args, **kwargs)
        if views_of_one(func, args, kwargs):
            views = torch.vmap(lambda own: func(own, *args[1:], **kwargs))(target)
            if any(t._base is not owner for t in (views if isinstance(views, tuple | list) else (views,))):
                raise StackingError(f"{torch.overrides.resolve_name(func) or func} of a stacked tensor "
                                    f"gave no view of it")
            return views
        if not writes_in_place(func, args, kwargs) or (torch.is_grad_enabled() and target.requires_grad):
            return func(*args, **kwargs)
        for g in range(self.members):
            own = target[g].clone(memory_format=torch.contiguous_format)
            func(own, *args[1:], **kwargs)
            target[g].copy_(own)
        return target

    # --- operands ----------------------------------------------------------------------------------

    def is_member(self, tensor: Tensor) -> bool:
        """A member tensor, or a view of one that keeps its member axis (MultiheadAttention's splits)."""
        return id(tensor) in self.member_tensors or (
            tensor._base is not None and id(tensor._base) in self.member_tensors)

    def member(self, tensor: Tensor) -> Tensor:
        """A tensor of the members' own shape with the member axis in front: a member tensor as it is,
        any other (a constant) repeated for each member."""
        return tensor if self.is_member(tensor) else tensor.expand(self.members, *tensor.shape)

    def split(self, x: Tensor, batch_axis: int) -> Tensor:
        """A folded operand (G*B along `batch_axis`) as (G, *each member's own shape)."""
        if x.dim() <= batch_axis or x.shape[batch_axis] % self.members:
            raise StackingError(f"a GEMM operand of shape {tuple(x.shape)} does not carry the members' "
                                f"batches folded along axis {batch_axis}")
        return x.unflatten(batch_axis, (self.members, -1)).movedim(batch_axis, 0)

    @staticmethod
    def fold(y: Tensor, batch_axis: int) -> Tensor:
        """(G, *member shape) back to the folded layout (G*B along `batch_axis`)."""
        return y.movedim(0, batch_axis).flatten(batch_axis, batch_axis + 1)

    # --- the GEMMs -------------------------------------------------------------------------------

    def linear_gemm(self, x: Tensor, weight: Tensor, bias: Tensor | None, quant: LayerQuant | None,
                    batch_axis: int, flat: bool) -> Tensor:
        xs = self.split(x, batch_axis)
        shape = xs.shape
        if flat:  # the member's rows as one matrix, as it runs alone
            xs = xs.reshape(self.members, -1, shape[-1])
        y = QuantGemm.apply(xs, self.member(weight), None if bias is None else self.member(bias),
                            quant or _FP32_GEMM)
        if flat:
            y = y.reshape(*shape[:-1], y.shape[-1])
        return self.fold(y, batch_axis)

    def conv_gemm(self, x: Tensor, weight: Tensor, bias: Tensor | None, op: ConvOp,
                  quant: LayerQuant | None) -> Tensor:
        xs, ws = self.split(x, 0), self.member(weight)
        bs = None if bias is None else self.member(bias)
        if quant is None:  # fp32: each member's GEMMs as torch's autograd computes them alone
            y = PlainStackedConv.apply(xs, ws, bs, StackedConvOp(op))
        else:
            y = QuantGemm.apply(xs, ws, bs, quant)
        return self.fold(y, 0)

    def matmul_gemm(self, a: Tensor, b: Tensor, quant: LayerQuant | None, weight_operand: int) -> Tensor:
        members = [self.is_member(a), self.is_member(b)]
        if all(members):
            raise StackingError("a matmul of two member tensors: neither operand carries the batch")
        operands = [t if own else self.split(t, 0) for t, own in zip((a, b), members, strict=True)]
        if min(t.dim() for t in operands) < 3:
            raise StackingError("a matmul with a 1-d operand (per member) does not stack")
        if quant is None:  # fp32: each member's own call. Alone torch folds x (B, n, k) @ W (k, m) into
            # one mm, whose weight gradient sums the B*n rows in another order than a batched matmul's
            # (each member's operands and gradient at their alignment alone: `at_alone_alignment`)
            aligned = [at_alone_alignment(t).unbind(0) for t in operands]
            y = torch.stack([_fresh_gradient(a_g @ b_g) for a_g, b_g in zip(*aligned, strict=True)])
        else:
            rank = max(t.dim() for t in operands)
            padded = [t.reshape(self.members, *[1] * (rank - t.dim()), *t.shape[1:]) if own else t
                      for t, own in zip(operands, members, strict=True)]
            if weight_operand and members[weight_operand - 1]:
                quant = _view_weights(quant, operands[weight_operand - 1].shape)
            y = QuantMatmulFn.apply(padded[0], padded[1], quant, weight_operand,
                                    MemberRanks(operands[0].dim() - 1, operands[1].dim() - 1))
        return self.fold(y, 0)

    def unquantized(self, func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Quantization switched off: the GEMMs in fp32 for all members at once; attention as torch
        computes it, member by member (its fused kernels are not batched GEMMs)."""
        if kind == "sdpa":
            query, mask = args[0], (args[3] if len(args) > 3 else kwargs.get("attn_mask"))
            batched_mask = (isinstance(mask, Tensor) and mask.dim() == query.dim()
                            and mask.shape[0] == query.shape[0] > 1)  # else it broadcasts over the batch
            axes = {"query": 0, "key": 0, "value": 0, **({"attn_mask": 0} if batched_mask else {})}
            return self._each_member(func, _SDPA_PARAMETERS, args, kwargs, axes, masks=(), out_axes=(0,))
        if kind == "mha":
            return self._each_member(func, _MHA_PARAMETERS, args, kwargs, {"query": 1, "key": 1, "value": 1,
                                                                          "key_padding_mask": 0},
                                     masks=("attn_mask",), out_axes=(1, 0))
        return dispatch(self, func, kind, args, kwargs)

    def _each_member(self, func: Any, names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any],
                     batch_axes: dict[str, int], masks: tuple[str, ...], out_axes: tuple[int, ...]) -> Any:
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        query = bound["query"]
        batch = query.shape[batch_axes["query"]] // self.members
        outputs = []
        for g in range(self.members):
            call = {}
            slices: dict[int, Tensor] = {}  # one slice per tensor: attention tests `query is key`
            for name, value in bound.items():
                if not isinstance(value, Tensor):
                    call[name] = value
                    continue
                if id(value) not in slices:
                    if self.is_member(value):
                        slices[id(value)] = value[g]
                    elif name in batch_axes:
                        slices[id(value)] = value.narrow(batch_axes[name], g * batch, batch)
                    elif name in masks and value.dim() == 3:  # (N * heads, L, S): the member's rows
                        rows = value.shape[0] // self.members
                        slices[id(value)] = value.narrow(0, g * rows, rows)
                    else:
                        slices[id(value)] = value
                call[name] = slices[id(value)]
            outputs.append(func(**call))
        if isinstance(outputs[0], Tensor):
            return torch.cat(outputs, out_axes[0])
        return tuple(None if parts[0] is None else torch.cat(parts, axis)
                     for parts, axis in zip(zip(*outputs, strict=True), out_axes, strict=True))


def _view_weights(quant: LayerQuant, shape: torch.Size) -> LayerQuant:
    """`quant` with its weight and weight-gradient quantizers taking a member weight of `shape` that
    the matmul sees with singleton axes after its member axis: each quantizes it in its own shape."""
    return dataclasses.replace(quant, weights=_viewed(quant.weights, shape),
                               weight_grads=_viewed(quant.weight_grads, shape))


def _viewed(quantizer: Quantizer | None, shape: torch.Size) -> Quantizer | None:
    if quantizer is None:
        return None
    if isinstance(quantizer, BlockQuantizer):
        return quantizer.reshaped(shape)
    return _Viewed(quantizer, shape)


@dataclasses.dataclass(frozen=True)
class _Viewed:
    """`quantizer` applied to a tensor seen in `shape` (a class, not a lambda: a group's layers pickle)."""

    quantizer: Quantizer
    shape: torch.Size

    def __call__(self, x: Tensor) -> Tensor:
        return self.quantizer(x.reshape(self.shape)).reshape(x.shape)

