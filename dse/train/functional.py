"""The GEMMs a forward calls as functions, quantized through a torch-function mode.

Module GEMMs (Linear, Conv1d/2d, Matmul) change class (dse/train/layers.py). Everything else that
multiplies matrices in a forward is a function call: `F.linear`, `torch.matmul` / `@`, `torch.mm`,
`torch.bmm`, `F.conv1d/2d`, `F.scaled_dot_product_attention`, and `F.multi_head_attention_forward`,
which nn.MultiheadAttention (and so nn.TransformerEncoderLayer / DecoderLayer) calls. While the
model's forward runs, a `TorchFunctionMode` sees each such call and runs it through the same
quantized autograd functions as the modules (`QuantGemm`, `QuantMatmulFn`), with the formats of the
GEMM's own layer. Attention (scaled dot product and multi-head) is computed here from its parts, so
that each of its GEMMs is one quantized GEMM: the in-projection(s), the scores `q k^T`, the context
`p v` and the out-projection.

A functional GEMM is named after its weight when its weight is a parameter (`F.linear(x, self.proj.weight)`
is `proj`, an `nn.Parameter` `self.w` of `block` is `block.w`), else after the module whose forward
called it and its place there (`block.matmul0`, `block.bmm1`, `attn.sdpa0.scores`); a
MultiheadAttention `attn` has `attn.in_proj` (or `attn.q_proj`, `.k_proj`, `.v_proj`),
`attn.scores`, `attn.context` and `attn.out_proj`. While the mode is active, `has_torch_function` is
true, so torch's fused fast paths for attention and transformer layers (eval, no grad) stay off and
evaluation is quantized too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.precision import Layer
from dse.train.layers import (
    _PLAIN_CLASS,
    MODULE_GEMM_KINDS,
    UNCONVERTIBLE_TYPES,
    ConvOp,
    LayerPolicies,
    LayerQuant,
    LinearOp,
    QuantGemm,
    QuantizedGemms,
    QuantSwitch,
    UnconvertedGemmWarning,
    class_names,
    gemm_quant,
    is_module_gemm,
    quant_matmul,
)
from dse.train.memory import state_kept
from dse.train.policy import QuantPolicy, TensorQuant
from dse.train.recompute import RecomputedMode, follow_checkpoints, function_modes

GEMM_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d",
    torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__matmul__: "matmul",
    Tensor.__rmatmul__: "rmatmul",
    torch.mm: "mm", Tensor.mm: "mm", torch.bmm: "bmm", Tensor.bmm: "bmm",
    F.scaled_dot_product_attention: "sdpa", F.multi_head_attention_forward: "mha",
}
"""The GEMM functions a forward may call, and how each is quantized."""
UNHANDLED_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.einsum: "torch.einsum", torch.tensordot: "torch.tensordot", torch.addmm: "torch.addmm",
    Tensor.addmm: "Tensor.addmm", torch.baddbmm: "torch.baddbmm", Tensor.baddbmm: "Tensor.baddbmm",
    torch.addbmm: "torch.addbmm", torch.mv: "torch.mv", Tensor.mv: "Tensor.mv",
    torch.chain_matmul: "torch.chain_matmul", F.conv3d: "F.conv3d",
    F.conv_transpose1d: "F.conv_transpose1d", F.conv_transpose2d: "F.conv_transpose2d",
    F.conv_transpose3d: "F.conv_transpose3d", F.bilinear: "F.bilinear",
    torch.lstm: "torch.lstm", torch.gru: "torch.gru", torch.rnn_tanh: "torch.rnn_tanh",
    torch.rnn_relu: "torch.rnn_relu", torch.cdist: "torch.cdist", torch.inner: "torch.inner",
    Tensor.inner: "Tensor.inner", torch.linalg.multi_dot: "torch.linalg.multi_dot",
    torch.addmv: "torch.addmv", Tensor.addmv: "Tensor.addmv", Tensor.addbmm: "Tensor.addbmm",
}
"""GEMM functions quantize_model does not convert: each call found is named in a warning."""
Example = Tensor | tuple[Any, ...]
"""What the model's forward takes: one tensor, or a tuple of positional arguments."""


@dataclass
class Site:
    """One GEMM of the model: a module GEMM (`module` set) or a functional one."""

    layer: Layer
    kind: str
    module: nn.Module | None = None


@dataclass
class FoundGemms:
    sites: list[Site]
    unconverted: list[str]
    functional: bool
    """Some GEMM is a function call (or was not looked for): the mode is needed."""
    searched: bool
    """A forward ran to find them (with `example_input`)."""
    operands: dict[str, None] = field(default_factory=dict)
    """The parameters and buffers (by name) that functional GEMMs take as operands (weights, biases)."""
    other_uses: dict[str, str] = field(default_factory=dict)
    """Parameters and buffers the forward passed to other torch functions: name -> the first such function."""


@dataclass
class _Frame:
    name: str
    module: nn.Module
    counts: dict[str, int] = field(default_factory=dict)

    def next(self, kind: str) -> str:
        index = self.counts.get(kind, 0)
        self.counts[kind] = index + 1
        return _join(self.name, f"{kind}{index}")


def _join(owner: str, part: str) -> str:
    return f"{owner}.{part}" if owner else part


class FunctionalGemms:
    """The functional GEMMs of one model: names, per-site quantizers, the mode and its hooks."""

    def __init__(self, model: nn.Module, policies: LayerPolicies | None, switch: QuantSwitch,
                 generator: torch.Generator | None, listing: QuantizedGemms | None = None) -> None:
        self.model = model
        self.listing = listing
        """quantize_model's returned list: GEMMs first seen while training join it."""
        self.policies = policies
        self.switch = switch
        self.generator = generator
        self.module_names = {id(m): name for name, m in model.named_modules()}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.param_owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        self.tensor_names = {**{id(b): name for name, b in model.named_buffers()}, **self.param_names}
        self.operands: dict[str, None] = {}
        """The parameters and buffers functional GEMMs took as operands, by name."""
        self.other_uses: dict[str, str] | None = None
        """While finding GEMMs: the parameters and buffers other torch functions took (name -> function)."""
        self.frames: list[_Frame] = []
        self.sites: dict[str, Site] = {}
        self.quants: dict[str, LayerQuant | None] = {}
        self.weights: dict[str, Tensor] = {}
        self.unconverted: dict[str, None] = {}
        self.handles: list[Any] = []
        self.entered: list[bool] = []
        """Per forward of the model now running: whether it runs inside another (re-entered)."""
        self.data_views: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}
        """`.data` of the model's tensors that are alive (by id: the view and the tensor it is `.data`
        of): a write of one in place is a write of its tensor (`data_of`)."""
        self.mode = _GemmMode(self)

    BY_ID: tuple[str, ...] = ("module_names", "param_names", "param_owner", "tensor_names")
    """The maps keyed by the id of a module or tensor of the model: a copy's are its own objects'."""

    def __getstate__(self) -> dict[str, Any]:
        """What a deepcopy, pickle or torch.save takes: the maps of `BY_ID` keyed by their objects (a
        copy's objects have other ids), and no mode: its weak reference to this object pickles not at
        all and deep-copies as it is (the copy's mode would run the original's GEMMs); `__setstate__`
        gives the copy a mode of its own."""
        state = dict(self.__dict__)
        del state["mode"]
        state["data_views"] = {}  # (weak references: a copy's forward makes its own)
        model = self.model
        objects = {id(o): o for o in (*model.modules(), *model.parameters(), *model.buffers())}
        for name in self.BY_ID:
            state[name] = [(objects[key], value) for key, value in state[name].items() if key in objects]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self.BY_ID:
            state[name] = {id(o): value for o, value in state[name]}
        self.__dict__.update(state)
        self.mode = _GemmMode(self)

    # --- hooks: the module stack, and the mode while the root's forward runs ---------------------

    def install(self) -> None:
        for module in self.model.modules():
            self.handles.append(module.register_forward_pre_hook(self._push))
            self.handles.append(module.register_forward_hook(self._pop, always_call=True))
        self.handles.append(self.model.register_forward_pre_hook(self._enter, prepend=True))
        self.handles.append(self.model.register_forward_hook(self._exit, always_call=True))
        follow_checkpoints()  # (a run checks this torch where it first checkpoints)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _enter(self, module: nn.Module, args: Any) -> None:
        """The mode on the stack for the model's forward; a model called inside its own forward
        (re-entered) keeps the one mode and its module stack (a second copy would take each GEMM the
        first hands on for another, and name the next GEMMs from a cleared stack)."""
        outer = self.mode in function_modes()
        self.entered.append(outer)
        if not outer:
            self.frames.clear()
            self.mode.__enter__()

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (self.entered.pop() if self.entered else False):
            self.mode.__exit__(None, None, None)

    def _push(self, module: nn.Module, args: Any) -> None:
        self.frames.append(_Frame(self.module_names.get(id(module), ""), module))

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.frames:
            self.frames.pop()

    # --- sites ---------------------------------------------------------------------------------

    def frame(self) -> _Frame:
        return self.frames[-1] if self.frames else _Frame("", self.model)

    def weight_layer(self, weight: Tensor) -> Layer | None:
        """The layer a parameter operand names (`proj.weight`: proj, `attn.in_proj_weight`: attn.in_proj)."""
        name = self.param_names.get(id(weight))
        if name is None:
            return None
        owner = self.param_owner[id(weight)]
        owner_name = self.module_names.get(id(owner), "")
        if name.endswith(".weight") or name == "weight":
            layer_name = owner_name
        else:
            layer_name = name[:-len("_weight")] if name.endswith("_weight") else name
        return Layer(layer_name or name, (owner_name,) if owner_name else (), class_names(type(owner)), True)

    def activation_layer(self, kind: str) -> Layer:
        frame = self.frame()
        return Layer(frame.next(kind), (frame.name,) if frame.name else (), class_names(type(frame.module)),
                     False)

    def quant(self, layer: Layer, kind: str, op: LinearOp | ConvOp | None, weight: Tensor | None = None
              ) -> LayerQuant | None:
        """The layer's quantizers (None: compute it in fp32: recording, switched off, or fp32 by rule)."""
        if layer.name not in self.sites:
            self.sites[layer.name] = Site(layer, kind)
            if weight is not None and isinstance(weight, nn.Parameter):
                self.weights[layer.name] = weight
            if self.listing is not None and self.policies is not None:
                self.listing.append(self.policies.gemm(layer, kind))
        if self.policies is None or not self.switch.enabled:
            return None
        op = self.gemm_op(op)
        if layer.name not in self.quants:
            policy = self.policies.of(layer)
            self.quants[layer.name] = self.build_quant(op, policy) if policy.quantizes_gemms else None
        quant = self.quants[layer.name]
        if quant is not None and op is not None and quant.op != op:
            quant = dataclasses.replace(quant, op=op)
        return quant

    def stored_weights(self) -> list[tuple[Tensor, TensorQuant]]:
        out = []
        for name, weight in self.weights.items():
            quant = self.quants.get(name)
            if quant is None and self.policies is not None and name in self.sites:
                quant = self.quant(self.sites[name].layer, self.sites[name].kind, None)
            if quant is not None and quant.master_weights is not None:
                out.append((weight, quant.master_weights))
        return out

    def note_unconverted(self, message: str) -> None:
        """A GEMM function left in fp32: recorded once; one first seen after quantize_model joins its
        list's `unconverted` and is warned about then."""
        if message in self.unconverted:
            return
        self.unconverted[message] = None
        if self.listing is not None and message not in self.listing.unconverted:
            self.listing.unconverted.append(message)
            warnings.warn(message, UnconvertedGemmWarning, stacklevel=2)

    def note_operands(self, *tensors: Tensor | None) -> None:
        """Record the model's own tensors among a GEMM's operands (a view of one counts as it; its
        `.data` is another use)."""
        for tensor in tensors:
            if isinstance(tensor, Tensor):
                name = self.tensor_names.get(id(tensor))
                if name is None and tensor._base is not None:
                    name = self.tensor_names.get(id(tensor._base))
                if name is not None:
                    self.operands.setdefault(name)
                data_of = self.data_of(tensor)
                if data_of is not None and self.other_uses is not None:
                    self.other_uses.setdefault(self.tensor_names[id(data_of)], _DATA_GET)

    def note_data(self, func: Any, args: tuple[Any, ...], result: Any) -> None:
        """Keep `result` as the `.data` of the model's tensor it was read from (`data_of`)."""
        if (getattr(func, "__self__", None) is Tensor.data and isinstance(result, Tensor) and args
                and id(args[0]) in self.tensor_names):
            key = id(result)
            views = self.data_views
            views[key] = (weakref.ref(result, lambda _: views.pop(key, None)), args[0])

    def data_of(self, tensor: Tensor) -> Tensor | None:
        """The model's tensor that `tensor` is the `.data` of (None: none)."""
        held = self.data_views.get(id(tensor))
        return held[1] if held is not None and held[0]() is tensor else None

    def note_uses(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record the model's own tensors (or their views, or their `.data`) a function other than a
        GEMM took (finding GEMMs only), but for a view of one (`views_of_one`) or a write of one in
        place (`writes_in_place`) that takes no other tensor, which a stacked network makes member by
        member, and the read of `.data` itself."""
        if (self.other_uses is None or writes_in_place(func, args, kwargs)
                or getattr(func, "__self__", None) is Tensor.data or views_of_one(func, args, kwargs)):
            return
        for value in (*args, *kwargs.values()):
            for tensor in (value if isinstance(value, (list, tuple)) else (value,)):
                if not isinstance(tensor, Tensor):
                    continue
                name = self.tensor_names.get(id(tensor))
                if name is None and tensor._base is not None:
                    name = self.tensor_names.get(id(tensor._base))
                data_of = self.data_of(tensor)
                if name is not None:
                    self.other_uses.setdefault(name, torch.overrides.resolve_name(func) or repr(func))
                elif data_of is not None:
                    self.other_uses.setdefault(self.tensor_names[id(data_of)], _DATA_GET)

    def unquantized(self, func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A GEMM function while quantization is switched off: torch's own."""
        return func(*args, **kwargs)

    def other_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call of a function other than a GEMM: as it is."""
        return func(*args, **kwargs)

    def gemm_op(self, op: LinearOp | ConvOp | None) -> Any:
        """The op a GEMM of this layer type runs (a stacked network's: per member)."""
        return op

    def build_quant(self, op: Any, policy: QuantPolicy) -> LayerQuant:
        """The quantizers of one GEMM under its layer's policy."""
        return gemm_quant(op, policy, self.switch, self.generator)

    def passthrough(self) -> bool:
        """Calls inside a module GEMM or an unconvertible module are not functional GEMMs."""
        module = self.frame().module
        return is_module_gemm(module) or isinstance(module, UNCONVERTIBLE_TYPES)

    # --- the GEMMs -----------------------------------------------------------------------------

    def linear(self, layer: Layer | None, kind: str, x: Tensor, weight: Tensor, bias: Tensor | None,
               batch_axis: int = 0, flat: bool = False) -> Tensor:
        """F.linear(x, weight, bias), the batch along `batch_axis` of x (a stacked network's folded
        batch); `flat`: as one matrix of rows x.reshape(-1, in) (the output keeps x's leading shape)."""
        layer = layer or self.weight_layer(weight) or self.activation_layer("linear")
        self.note_operands(weight, bias)
        quant = self.quant(layer, kind, LinearOp(), weight)
        return self.linear_gemm(x, weight, bias, quant, batch_axis, flat)

    def linear_gemm(self, x: Tensor, weight: Tensor, bias: Tensor | None, quant: LayerQuant | None,
                    batch_axis: int, flat: bool) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]) if flat else x
        y = F.linear(rows, weight, bias) if quant is None else QuantGemm.apply(rows, weight, bias, quant)
        return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y

    def conv(self, dims: int, x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
        layer = self.weight_layer(weight) or self.activation_layer(f"conv{dims}d")
        stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
        kernel = tuple(weight.shape[-dims:])
        if isinstance(padding, str):
            pads = _same_padding(kernel, dilation) if padding == "same" else [(0, 0)] * dims
            if any(left != right for left, right in pads):
                x = F.pad(x, [p for pair in reversed(pads) for p in pair])
                pads = [(0, 0)] * dims
            padding = tuple(left for left, _ in pads)
        op = ConvOp(stride, _tuple(padding, dims), dilation, groups)
        self.note_operands(weight, bias)
        quant = self.quant(layer, f"conv{dims}d", op, weight)
        return self.conv_gemm(x, weight, bias, op, quant)

    def conv_gemm(self, x: Tensor, weight: Tensor, bias: Tensor | None, op: ConvOp,
                  quant: LayerQuant | None) -> Tensor:
        if quant is None:
            return op.forward(x, weight, bias)
        return QuantGemm.apply(x, weight, bias, quant)

    def matmul(self, layer: Layer | None, kind: str, a: Tensor, b: Tensor) -> Tensor:
        weight_operand = 0
        if layer is None:
            for index, operand in ((2, b), (1, a)):
                layer = self.weight_layer(operand)
                if layer is not None:
                    weight_operand = index
                    break
            else:
                layer = self.activation_layer(kind)
        weight = b if weight_operand == 2 else a if weight_operand == 1 else None
        self.note_operands(a, b)
        quant = self.quant(layer, kind, None, weight)
        if quant is not None and weight_operand == 0:
            quant = dataclasses.replace(quant, weights=None, weight_grads=None)
        return self.matmul_gemm(a, b, quant, weight_operand)

    def matmul_gemm(self, a: Tensor, b: Tensor, quant: LayerQuant | None, weight_operand: int) -> Tensor:
        return torch.matmul(a, b) if quant is None else quant_matmul(a, b, quant, weight_operand)

    def attention(self, base: str | None, kind: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                  dropout_p: float, scale: float, safe_softmax: bool) -> tuple[Tensor, Tensor]:
        """softmax(q k^T * scale + mask) v, its two GEMMs named base.scores and base.context; with
        `safe_softmax` a fully masked row gets zero weights (torch's SDPA) instead of NaN (torch's MHA
        when it returns the weights)."""
        frame = self.frame()
        base = base if base is not None else frame.next("sdpa")
        aliases = (frame.name,) if frame.name else ()
        types = class_names(type(frame.module))
        scores = self.matmul(Layer(_join(base, "scores"), aliases, types, False), kind, q,
                             k.transpose(-2, -1))
        scores = scores * scale
        blocked = None
        if mask is not None:
            scores = scores + mask
            if safe_softmax:  # a query that may attend to nothing: zero weights, not NaN (torch SDPA)
                blocked = torch.isneginf(scores).all(dim=-1, keepdim=True)
                scores = scores.masked_fill(blocked, 0.0)
        weights = torch.softmax(scores, dim=-1)
        if blocked is not None:
            weights = weights.masked_fill(blocked, 0.0)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        context = self.matmul(Layer(_join(base, "context"), aliases, types, False), kind, weights, v)
        return context, weights


class _GemmMode(RecomputedMode):
    """Routes GEMM function calls to `FunctionalGemms`; every other call runs as it is."""

    def __init__(self, gemms: FunctionalGemms) -> None:
        super().__init__()
        self._gemms = weakref.ref(gemms)
        """Weak: the FunctionalGemms holds its mode, and the cycle of the two kept a dropped recorder's
        model and tensors alive until Python's cyclic collector ran (at no time a run could plan for)."""

    @property
    def gemms(self) -> FunctionalGemms:
        gemms = self._gemms()
        assert gemms is not None, "a FunctionalGemms' mode outlived it"
        return gemms

    def recompute_state(self) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """A checkpointed block recomputed in the backward names its GEMMs from the module stack of its
        forward (a frame's calls counted from where they stood: `block.matmul1` stays block.matmul1)."""
        gemms = self.gemms
        frames = [dataclasses.replace(frame, counts=dict(frame.counts)) for frame in gemms.frames]

        @contextlib.contextmanager
        def as_then() -> Iterator[None]:
            previous = gemms.frames
            gemms.frames = [dataclasses.replace(frame, counts=dict(frame.counts)) for frame in frames]
            try:
                yield
            finally:
                gemms.frames = previous

        return as_then

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = GEMM_FUNCTIONS.get(func)
        gemms = self.gemms
        if kind is None:
            name = UNHANDLED_FUNCTIONS.get(func)
            if name is not None and not gemms.passthrough() and not _one_operand_einsum(func, args):
                owner = gemms.frame()
                where = owner.name or "model"
                gemms.note_unconverted(f"{where} ({type(owner.module).__name__}): {name} stays fp32 "
                                       f"(quantize_model does not convert it)")
            result = gemms.other_call(func, args, kwargs)
            gemms.note_data(func, args, result)
            if gemms.other_uses is not None and isinstance(result, (Tensor, tuple, list)):
                gemms.note_uses(func, args, kwargs)  # metadata (shape, dtype) does not count
            return result
        if gemms.passthrough():
            return func(*args, **kwargs)
        if gemms.policies is not None and not gemms.switch.enabled:
            return gemms.unquantized(func, kind, args, kwargs)
        return dispatch(gemms, func, kind, args, kwargs)


_DATA_GET = "torch.Tensor.data.__get__"
"""What reading a tensor's `.data` is called in a reason."""


VIEW_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.t, torch.t, Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.permute,
    torch.permute, Tensor.__getitem__, Tensor.narrow, torch.narrow, Tensor.chunk, torch.chunk, Tensor.split,
    torch.split, Tensor.unbind, torch.unbind, Tensor.view, Tensor.unsqueeze, torch.unsqueeze, Tensor.squeeze,
    torch.squeeze, Tensor.unflatten,
})
"""Calls that return views of their tensor (`w.t()`, `w[:k]`, `w.chunk(3)`): of a member tensor, each
member's view of its own (`views_of_one`)."""

_VIEW_PROPERTIES = ("T", "mT")


def views_of_one(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call is one of VIEW_FUNCTIONS (or the property T or mT) of one tensor, taking no other
    tensor (an index tensor neither)."""
    owner = getattr(func, "__self__", None)
    if not (func in VIEW_FUNCTIONS or any(owner is getattr(Tensor, p) for p in _VIEW_PROPERTIES)):
        return False
    if not args or not isinstance(args[0], Tensor):
        return False
    return not any(isinstance(t, Tensor) for value in (*args[1:], *kwargs.values())
                   for t in (value if isinstance(value, list | tuple) else (value,)))


def writes_in_place(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call is a tensor method that writes its tensor in place and takes no other tensor
    (`w.renorm_(2, 0, 1.0)`, `w.clamp_(-1, 1)`, `w.mul_(0.5)`: a max-norm constraint on a weight)."""
    name = getattr(func, "__name__", "")
    if not (name.endswith("_") and not name.endswith("__") and getattr(Tensor, name, None) is func
            and args and isinstance(args[0], Tensor)):
        return False
    return not any(isinstance(t, Tensor) for value in (*args[1:], *kwargs.values())
                   for t in (value if isinstance(value, list | tuple) else (value,)))


def _one_operand_einsum(func: Any, args: tuple[Any, ...]) -> bool:
    """torch.einsum of one operand ("ii->i", "ij->i"): a trace or a sum, no GEMM to leave fp32. Its
    operands come after the equation, or as one list, or interleaved with their sublists."""
    if func is not torch.einsum:
        return False
    values = [*args[1:]] if args and isinstance(args[0], str) else [*args]
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = [*values[0]]
    return sum(isinstance(value, Tensor) for value in values) < 2


def dispatch(gemms: FunctionalGemms, func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> Any:
    """Run one call of a GEMM function (`func`, of `kind` in GEMM_FUNCTIONS) through `gemms`."""
    if kind == "linear":
        return gemms.linear(None, "F.linear", *_bind(_LINEAR_ARGS, args, kwargs))
    if kind in ("conv1d", "conv2d"):
        return gemms.conv(int(kind[4]), *args, **kwargs)
    if kind in ("matmul", "mm", "bmm"):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        if b is None:
            return func(*args, **kwargs)  # torch's own error for a missing operand
        return gemms.matmul(None, kind, a, b)
    if kind == "rmatmul":
        return gemms.matmul(None, "matmul", args[1], args[0])
    if kind == "sdpa":
        return _sdpa(gemms, *args, **kwargs)
    return _multi_head_attention(gemms, *args, **kwargs)


_LINEAR_ARGS = ("input", "weight", "bias")


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """(left, right) per spatial dim of padding='same' (the extra one on the right, as torch pads)."""
    pads = []
    for size, step in zip(kernel, dilation, strict=True):
        total = step * (size - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def _float_mask(mask: Tensor | None, dtype: torch.dtype, true_blocks: bool) -> Tensor | None:
    """An additive float mask; a bool mask blocks where True (MHA) or where False (SDPA)."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    blocked = mask if true_blocks else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(blocked, float("-inf"))


def _sdpa(gemms: FunctionalGemms, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
          enable_gqa: bool = False) -> Tensor:
    """F.scaled_dot_product_attention from its two GEMMs."""
    length, source = query.shape[-2], key.shape[-2]
    mask = _float_mask(attn_mask, query.dtype, true_blocks=False)
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril_()
        mask = _float_mask(causal, query.dtype, true_blocks=False)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    out, _ = gemms.attention(None, "sdpa", query, key, value, mask, dropout_p, scale, safe_softmax=True)
    return out


def _multi_head_attention(
        gemms: FunctionalGemms, query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int,
        num_heads: int, in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None,
        bias_v: Tensor | None, add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor,
        out_proj_bias: Tensor | None, training: bool = True, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False,
        q_proj_weight: Tensor | None = None, k_proj_weight: Tensor | None = None,
        v_proj_weight: Tensor | None = None, static_k: Tensor | None = None, static_v: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """F.multi_head_attention_forward from its GEMMs: in-projection(s), scores, context, out-projection.

    Same arguments and results as torch's (sequence-first (L, N, E) or unbatched (L, E) inputs).
    """
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if embed_dim_to_check != query.shape[-1]:
        raise RuntimeError(f"was expecting embedding dimension of {embed_dim_to_check}, "
                           f"but got {query.shape[-1]}")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    frame = gemms.frame()
    base = frame.name
    aliases = (base,) if base else ()
    types = class_names(type(frame.module))

    def layer(part: str, has_weight: bool = True) -> Layer:
        return Layer(_join(base, part), aliases, types, has_weight)

    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    if not use_separate_proj_weight:
        assert in_proj_weight is not None
        in_proj = layer("in_proj")
        # weights (out, in) and biases (out,) split along their out axis: -2 and -1 (in a stacked
        # network they carry a leading member axis)
        if query is key and key is value:
            q, k, v = gemms.linear(in_proj, "mha", query, in_proj_weight, in_proj_bias, 1).chunk(3, dim=-1)
        else:
            w_q, w_kv = in_proj_weight.split([embed_dim, 2 * embed_dim], dim=-2)
            b_q, b_kv = (in_proj_bias.split([embed_dim, 2 * embed_dim], dim=-1) if in_proj_bias is not None
                         else (None, None))
            q = gemms.linear(in_proj, "mha", query, w_q, b_q, 1)
            if key is value:
                k, v = gemms.linear(in_proj, "mha", key, w_kv, b_kv, 1).chunk(2, dim=-1)
            else:
                w_k, w_v = w_kv.chunk(2, dim=-2)
                b_k, b_v = b_kv.chunk(2, dim=-1) if b_kv is not None else (None, None)
                k = gemms.linear(in_proj, "mha", key, w_k, b_k, 1)
                v = gemms.linear(in_proj, "mha", value, w_v, b_v, 1)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        b_q, b_k, b_v = in_proj_bias.chunk(3, dim=-1) if in_proj_bias is not None else (None, None, None)
        q = gemms.linear(layer("q_proj"), "mha", query, q_proj_weight, b_q, 1)
        k = gemms.linear(layer("k_proj"), "mha", key, k_proj_weight, b_k, 1)
        v = gemms.linear(layer("v_proj"), "mha", value, v_proj_weight, b_v, 1)
    attn_mask = _float_mask(attn_mask, q.dtype, true_blocks=True)
    key_padding_mask = _float_mask(key_padding_mask, q.dtype, true_blocks=True)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = (static_k if static_k is not None
         else k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1))
    v = (static_v if static_v is not None
         else v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1))
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    src_len = k.shape[1]
    if key_padding_mask is not None:
        padding = key_padding_mask.reshape(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        padding = padding.reshape(bsz * num_heads, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    out, weights = gemms.attention(base, "mha", q, k, v, attn_mask, dropout_p if training else 0.0,
                                   1.0 / math.sqrt(head_dim), safe_softmax=not need_weights)
    out = out.transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
    out = gemms.linear(layer("out_proj"), "mha", out, out_proj_weight, out_proj_bias, 1, flat=True)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(bsz, num_heads, tgt_len, src_len)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, (weights if batched else weights.squeeze(0))


# --- finding a model's GEMMs -----------------------------------------------------------------------

def _mha_layers(name: str, module: nn.MultiheadAttention) -> list[Site]:
    types = class_names(type(module))
    aliases = (name,) if name else ()

    def site(part: str, has_weight: bool, part_types: tuple[str, ...] = types) -> Site:
        return Site(Layer(_join(name, part), aliases, part_types, has_weight), "mha")

    projections = ["in_proj"] if module._qkv_same_embed_dim else ["q_proj", "k_proj", "v_proj"]
    return [*(site(p, True) for p in projections), site("scores", False), site("context", False),
            site("out_proj", True, class_names(type(module.out_proj)))]


def find_gemms(model: nn.Module, example_input: Example | None) -> FoundGemms:
    """Every GEMM of the model in registration order: module GEMMs and MultiheadAttention's from the
    module tree; with `example_input`, functional GEMMs from one forward (state left as it was)."""
    previous = functional_gemms(model)
    if previous is not None:
        previous.remove()
    by_owner: dict[str, list[Site]] = {}
    unconverted: list[str] = []
    if example_input is not None:
        recorder = FunctionalGemms(model, None, QuantSwitch(), None)
        recorder.other_uses = {}
        for module in model.modules():  # module GEMMs compute plainly while looking
            if type(module) in _PLAIN_CLASS:
                module.__class__ = _PLAIN_CLASS[type(module)]
        recorder.install()
        try:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            with torch.random.fork_rng(devices=_devices(args)), torch.enable_grad(), state_kept(model):
                model(*args)
        finally:
            recorder.remove()
        for site in recorder.sites.values():
            if site.kind == "mha":
                continue  # the module tree names them
            by_owner.setdefault(site.layer.aliases[0] if site.layer.aliases else "", []).append(site)
        unconverted.extend(recorder.unconverted)
        operands, other_uses = recorder.operands, recorder.other_uses
    else:
        operands, other_uses = {}, {}
    sites: list[Site] = by_owner.pop("", [])
    functional = example_input is None or bool(sites)
    for name, module in model.named_modules():
        plain = _PLAIN_CLASS.get(type(module), type(module))
        if plain in MODULE_GEMM_KINDS:
            kind = MODULE_GEMM_KINDS[plain]
            sites.append(Site(Layer(name, (), class_names(plain), kind != "matmul"), kind, module))
        elif isinstance(module, nn.MultiheadAttention):
            sites.extend(_mha_layers(name, module))
            functional = True
            for tensor_name in _MHA_OPERANDS:
                if _tensor(module, tensor_name) is not None:
                    operands.setdefault(_join(name, tensor_name))
        elif isinstance(module, UNCONVERTIBLE_TYPES):
            unconverted.append(f"{name or 'model'} ({type(module).__name__}): its GEMMs stay fp32 "
                               f"(quantize_model cannot convert {type(module).__name__})")
        owned = by_owner.pop(name, [])
        functional = functional or bool(owned)
        sites.extend(owned)
    for owned in by_owner.values():
        sites.extend(owned)
    return FoundGemms(sites, unconverted, functional, example_input is not None, operands, other_uses or {})


_MHA_OPERANDS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "out_proj.weight", "out_proj.bias")
"""The tensors of nn.MultiheadAttention its GEMMs take (bias_k and bias_v are concatenated instead)."""


def _tensor(module: nn.Module, name: str) -> Tensor | None:
    owner, _, attribute = name.rpartition(".")
    value = getattr(module.get_submodule(owner), attribute, None)
    return value if isinstance(value, Tensor) else None


def model_layers(model: nn.Module, example_input: Example | None = None) -> list[Layer]:
    """The model's GEMM layers as per-layer rules see them, in order (the model is left as it was)."""
    return [site.layer for site in find_gemms(model, example_input).sites]


def _devices(args: tuple[Any, ...]) -> list[torch.device]:
    return list({a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"})


def attach(model: nn.Module, found: FoundGemms, policies: LayerPolicies, switch: QuantSwitch,
           generator: torch.Generator | None, listing: QuantizedGemms | None = None) -> None:
    """Install the mode on the model when it has functional GEMMs (or they were not looked for);
    GEMMs it first meets while the model runs join `listing`."""
    model.__dict__.pop("dse_functional_gemms", None)
    if found.functional:
        install(model, found, FunctionalGemms(model, policies, switch, generator, listing))


def install(model: nn.Module, found: FoundGemms, gemms: FunctionalGemms) -> None:
    """Give `gemms` the functional GEMMs `found` (names, weights) and run the model's forward under them."""
    gemms.unconverted.update(dict.fromkeys(found.unconverted))
    for site in found.sites:
        if site.module is None:
            gemms.sites[site.layer.name] = site
    for name, p in model.named_parameters():  # MHA weights, for storage without a master copy
        for site in found.sites:
            if site.module is None and site.layer.has_weight and _weight_of(site.layer.name, name):
                gemms.weights.setdefault(site.layer.name, p)
    gemms.install()
    model.__dict__["dse_functional_gemms"] = gemms


def _weight_of(layer_name: str, param_name: str) -> bool:
    return param_name in (f"{layer_name}_weight", f"{layer_name}.weight", layer_name)


def functional_gemms(model: nn.Module) -> FunctionalGemms | None:
    gemms = model.__dict__.get("dse_functional_gemms")
    return gemms if isinstance(gemms, FunctionalGemms) else None
