"""The GEMMs a PyTorch model runs, found by running it: every module, functional call and attention.

One forward pass on a few samples runs under a torch dispatch mode, which sees each operation after
PyTorch has broken it down into its kernels: every `nn.Linear`, `nn.Conv*d`, `nn.MultiheadAttention`
(projections and both attention products, fused or not), `F.linear`, `torch.matmul`/`@`, `torch.bmm`,
`torch.einsum`, `torch.inner`, `torch.addmv`, `torch.addbmm` and `F.scaled_dot_product_attention` reaches
it as a matrix product (mm, addmm, bmm, baddbmm, mv, addmv, addbmm), a convolution (transposed ones
too) or a fused attention kernel. An operand that shares storage with a parameter is
a weight; the layer is named after that parameter (`fc.weight` -> `fc`), or else after the module that
ran it. The energy model derives the backward-data, backward-weight and update work of each forward
GEMM (see models.workloads.GemmLayer), so this records the forward shapes per sample. Recurrent
layers (nn.LSTM, nn.GRU, nn.RNN) run fused kernels, so their GEMMs are read from the module (per
layer and direction, the input and the recurrent projection); a kernel it cannot take apart is named
in a warning, never silently left out.

A caller that knows what training leaves in fp32 (`LeftFp32`: the modules and functions it cannot
quantize) gets the GEMMs that ran inside one of them named in Workload.fp32_layers: one rule for
modules and functions, whatever the tracer names the GEMM (a torch.einsum over a parameter is named
after it, training names the call after its module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dse.models.workloads import GemmLayer, UnpricedWarning, Workload, layer_name_of, matmul, unique_names

aten = torch.ops.aten
TRACE_SAMPLES = 2
"""Samples the traced forward runs on (shapes are per sample, so two suffice to tell the batch apart)."""
_PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv, aten.addmv, aten.addbmm}
_ADDED = {aten.addmm, aten.baddbmm, aten.addmv, aten.addbmm}
"""The products whose first argument is the term added (their factors follow it)."""
_FUSED_ATTENTION = {getattr(aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(aten, name)}
_UNPRICED_WORDS = ("rnn", "lstm", "gru", "_int_mm", "_weight_int", "cdist", "euclidean_dist")
"""Kernels that hold GEMMs this tracer does not take apart (recurrent layers, integer matmuls, torch.cdist's
distances, a GEMM past 25 rows): a model
that runs one gets a warning naming it, never a silent gap."""


@dataclass(frozen=True)
class LeftFp32:
    """The functions and module classes a trained network computes in fp32 whatever its formats (the
    training emulation cannot quantize them); the tracer itself knows nothing of training."""

    functions: frozenset[Any] = frozenset()
    modules: tuple[type[nn.Module], ...] = ()


class _LeftFp32Calls(TorchFunctionMode):
    """Counts the calls of LeftFp32 functions running (a GEMM recorded meanwhile is left fp32); a call
    inside one is not seen (torch runs it with this mode off), as training's mode does not."""

    def __init__(self, recorder: _Recorder, functions: frozenset[Any]) -> None:
        super().__init__()
        self.recorder = recorder
        self.functions = functions

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func not in self.functions:
            return func(*args, **(kwargs or {}))
        self.recorder.fp32_calls += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.recorder.fp32_calls -= 1


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def _in_checkpoint() -> bool:
    """Whether a block torch.utils.checkpoint checkpoints is running (its `checkpoint`, which both
    forms and `checkpoint_sequential` go through, is on the stack): its GEMMs run again in the backward."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "checkpoint" and frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _Recorder(TorchDispatchMode):
    """Records each GEMM-shaped kernel as a GemmLayer, named by weight or by the running module."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: torch would wrap `__torch_dispatch__` in `torch._disable_dynamo`, whose first call
        imports torch._dynamo (about a second, every sweep's energy estimate paid it) only to keep
        torch.compile out of a mode that nothing compiles."""
        return False

    def __init__(self, model: nn.Module, samples: int, left_fp32: LeftFp32 | None = None) -> None:
        super().__init__()
        self.samples = samples
        self.left_fp32 = left_fp32 or LeftFp32()
        self.fp32_calls = 0
        """LeftFp32 function calls running now."""
        self.inputs: set[int] = set()
        """The storages of the model's inputs (a view of one is one)."""
        self.fp32: list[bool] = []
        """Per recorded layer, whether it ran inside a LeftFp32 module or function."""
        self.attention_products: dict[int, int] = {}
        """Per running module, the products of two activations recorded since it was entered: an
        nn.MultiheadAttention's first is its scores, its second its context (`_product_role`)."""
        self.weights: dict[int, str] = {}
        for name, param in model.named_parameters():
            self.weights.setdefault(param.untyped_storage().data_ptr(), name)
        self.module_names = {id(module): name for name, module in model.named_modules()}
        self.leaves = {id(m) for m in model.modules() if not list(m.children()) and not list(m.parameters())}
        self.stack: list[nn.Module] = []
        self.layers: list[GemmLayer] = []
        self.used_weights: set[str] = set()
        self.unpriced: set[str] = set()

    # the module that is running, from global forward hooks
    def enter_module(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        outermost = not self._in_recurrent()
        self.stack.append(module)
        self.attention_products[id(module)] = 0
        if isinstance(module, nn.RNNBase) and outermost:
            self._recurrent(module, args[0] if args else None)

    def _left_fp32(self) -> bool:
        """Whether a GEMM now runs where training leaves it fp32 (LeftFp32)."""
        return self.fp32_calls > 0 or any(isinstance(m, self.left_fp32.modules) for m in self.stack)

    def _append(self, layer: GemmLayer) -> None:
        self.layers.append(dataclasses.replace(layer, recomputed=True) if _in_checkpoint() else layer)
        self.fp32.append(self._left_fp32())

    def leave_module(self, module: nn.Module, *_: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def _in_recurrent(self) -> bool:
        return any(isinstance(m, nn.RNNBase) for m in self.stack)

    def _recurrent(self, module: nn.RNNBase, x: Any) -> None:
        """nn.LSTM / nn.GRU / nn.RNN from the module itself (their kernels are fused): per layer and
        direction, the input projection [T, in] x [in, gates*H] and the recurrent one [T, H] x [H, gates*H]
        (one row per time step), plus the LSTM projection [T, H] x [H, proj] when it has one."""
        if not isinstance(x, Tensor):
            self.unpriced.add(f"{self.module_names.get(id(module), 'rnn')} (a packed sequence)")
            return
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        steps = x.shape[-2] if x.dim() == 2 else x.shape[1] if module.batch_first else x.shape[0]
        hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
        out = proj or hidden
        directions = 2 if module.bidirectional else 1
        prefix = self.module_names.get(id(module), "")
        prefix = f"{prefix}." if prefix else ""
        for layer in range(module.num_layers):
            d_in = module.input_size if layer == 0 else out * directions
            for suffix in ("", "_reverse")[:directions]:
                products = [("ih", d_in, gates * hidden, layer > 0 or self._grad(x)),
                            ("hh", out, gates * hidden, True)]
                if proj:
                    products.append(("hr", hidden, proj, True))
                for kind, k, n, grad in products:
                    weight = f"{prefix}weight_{kind}_l{layer}{suffix}"
                    repeated = weight in self.used_weights
                    self.used_weights.add(weight)
                    frozen = not getattr(module, weight.removeprefix(prefix)).requires_grad
                    self._append(GemmLayer(layer_name_of(weight), m=steps, k=k, n=n,
                                           needs_input_grad=grad, needs_weight_grad=not frozen,
                                           repeated_weight=repeated))

    def _grad(self, tensor: Tensor) -> bool:
        """Whether autograd differentiates `tensor` in training: its requires_grad, except in the first
        forward of a reentrant checkpoint, which runs without autograd (its recomputation has it): there
        every operand but the model's input and a frozen parameter."""
        if tensor.requires_grad or torch.is_grad_enabled() or not _in_checkpoint():
            return tensor.requires_grad
        return self._param(tensor) is None and tensor.untyped_storage().data_ptr() not in self.inputs

    def _trained_param(self, tensor: Any) -> bool:
        """Whether `tensor` is a parameter that trains (a GEMM's bias)."""
        return isinstance(tensor, Tensor) and tensor.requires_grad and self._param(tensor) is not None

    def _param(self, tensor: Any) -> str | None:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return None
        return self.weights.get(tensor.untyped_storage().data_ptr())

    def _product_role(self) -> str:
        """The name of a product of two activations: in an nn.MultiheadAttention, `scores` (q k^T) then
        `context` (softmax x v), as a fused attention kernel's and as training names them, whichever
        kernels torch picks (two bmm where the weights are returned, in training with dropout)."""
        module = self.stack[-1] if self.stack else None
        if not isinstance(module, nn.MultiheadAttention):
            return "matmul"
        count = self.attention_products[id(module)]
        self.attention_products[id(module)] = count + 1
        return ("scores", "context")[count % 2]

    def _module_name(self, suffix: str) -> str:
        module = next((m for m in reversed(self.stack) if id(m) in self.module_names), None)
        name = self.module_names.get(id(module), "") if module is not None else ""
        if module is not None and id(module) in self.leaves and suffix == "matmul":
            return name or suffix  # a parameter-free leaf such as models.layers.Matmul is the product
        return f"{name}.{suffix}" if name else suffix

    def _record(self, layer: GemmLayer, weight: str | None, suffix: str) -> None:
        repeated = weight in self.used_weights  # a layer applied again, or a tied weight: stored once
        if weight is not None:
            self.used_weights.add(weight)
        base = layer_name_of(weight) if weight is not None else self._module_name(suffix)
        self._append(dataclasses.replace(layer, name=base, repeated_weight=repeated))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if self._in_recurrent():
            return out  # counted from the module (see _recurrent)
        if packet in _PRODUCTS:
            a, b = (args[1], args[2]) if packet in _ADDED else (args[0], args[1])
            a_weight, b_weight = self._param(a), self._param(b)
            grad = (self._grad(a) and a_weight is None) or (self._grad(b) and b_weight is None)
            b_grad = self._grad(b if b_weight is not None else a)  # a frozen weight gets none
            if a_weight is None and b_weight is None:  # two activations: each gradient only where needed
                grad, b_grad = self._grad(a), self._grad(b)
            layer = matmul("", tuple(a.shape), tuple(b.shape), self.samples, a_weight is not None,
                           b_weight is not None, grad, b_grad)
            if packet in _ADDED and self._trained_param(args[0]):
                layer = dataclasses.replace(layer, needs_bias_grad=True)
            self._record(layer, b_weight or a_weight,
                         "matmul" if a_weight or b_weight else self._product_role())
        elif packet is aten.convolution:
            self._convolution(args, out)
        elif any(word in str(packet) for word in _UNPRICED_WORDS):
            self.unpriced.add(f"{self._module_name(str(packet).removeprefix('aten.'))} ({packet})")
        elif func in _FUSED_ATTENTION or packet in _FUSED_ATTENTION:
            q, k, v = args[:3]
            groups = max(1, math.prod(q.shape[:-2]) // self.samples)
            shared: dict[str, Any] = {"groups": groups, "b_is_weight": False, "kind": "attention"}
            scores = self._grad(q) or self._grad(k)  # softmax(q k^T) needs a gradient
            self._record(GemmLayer("", m=q.shape[-2], k=q.shape[-1], n=k.shape[-2], **shared,
                                   needs_input_grad=self._grad(q), needs_weight_grad=self._grad(k)),
                         None, "scores")
            self._record(GemmLayer("", m=q.shape[-2], k=k.shape[-2], n=v.shape[-1], **shared,
                                   needs_input_grad=scores, needs_weight_grad=self._grad(v)),
                         None, "context")
        return out

    def _convolution(self, args: tuple[Any, ...], out: Tensor) -> None:
        x, w = args[0], args[1]
        transposed, groups = bool(args[6]), int(args[8])
        kernel = math.prod(w.shape[2:])
        weight = self._param(w)
        grad = self._grad(x)
        shared: dict[str, Any] = {"groups": groups, "input_elems": x.numel() // self.samples,
                                  "b_is_weight": weight is not None, "needs_input_grad": grad, "kind": "conv",
                                  "needs_weight_grad": w.requires_grad,
                                  "needs_bias_grad": self._trained_param(args[2])}
        if transposed:  # each input position scatters (c_in/g) x (c_out/g * kernel) products
            layer = GemmLayer("", m=math.prod(x.shape[2:]), k=w.shape[0] // groups, n=w.shape[1] * kernel,
                              **shared)
        else:
            layer = GemmLayer("", m=math.prod(out.shape[2:]), k=w.shape[1] * kernel, n=w.shape[0] // groups,
                              **shared)
        self._record(layer, weight, "conv")


def trace_model(model: nn.Module, inputs: Tensor, name: str, batch_size: int, optimizer: str = "sgd",
                description: str = "", left_fp32: LeftFp32 | None = None) -> Workload:
    """The GEMMs `model` runs on `inputs` (first dimension: samples), per sample, in call order.

    A layer whose operands need no gradient (the first one) gets needs_input_grad=False, one whose weight
    is frozen (requires_grad=False) needs_weight_grad=False. Parameters that no GEMM uses as its weight
    (biases, norms, embeddings) go to extra_params; nn.Embedding tables are named in `embeddings`, frozen
    ones in `frozen`; the GEMMs run inside `left_fp32`'s modules and functions in `fp32_layers`, those a
    block checkpointed by torch.utils.checkpoint runs `recomputed`. The model runs in training mode, as
    training runs it (a forward may checkpoint only then), with its buffers, its mode and torch's random
    state left as they were; an error inside it becomes a ValueError naming the model.
    """
    samples = inputs.shape[0]
    recorder = _Recorder(model, samples, left_fp32)
    recorder.inputs.add(inputs.untyped_storage().data_ptr())
    calls = (_LeftFp32Calls(recorder, recorder.left_fp32.functions) if recorder.left_fp32.functions
             else contextlib.nullcontext())
    # (not push/pop: those are TorchDispatchMode's own classmethods, which a mode must not shadow)
    hooks = [nn.modules.module.register_module_forward_pre_hook(recorder.enter_module),
             nn.modules.module.register_module_forward_hook(recorder.leave_module)]
    was_training = model.training
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]  # (a norm's running statistics)
    try:
        model.train()
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), recorder, calls:
            model(inputs)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, kept in buffers:
                buffer.copy_(kept)
        for hook in hooks:
            hook.remove()
    if recorder.unpriced:
        warnings.warn(f"{name}: not priced (GEMMs inside kernels the tracer does not take apart): "
                      f"{', '.join(sorted(recorder.unpriced))}", UnpricedWarning, stacklevel=2)
    extra = {param_name: p.numel() for param_name, p in model.named_parameters()
             if param_name not in recorder.used_weights}
    tables = {f"{module_name}.weight" if module_name else "weight"
              for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    frozen = tuple(param_name for param_name, p in model.named_parameters()
                   if param_name in extra and not p.requires_grad)
    layers = tuple(unique_names(recorder.layers))
    return Workload(name, layers, batch_size=batch_size, optimizer=optimizer,
                    extra_params=extra, embeddings=tuple(n for n in extra if n in tables), frozen=frozen,
                    description=description or f"{type(model).__name__}, batch {batch_size}",
                    fp32_layers=tuple(layer.name for layer, fp32 in zip(layers, recorder.fp32, strict=True)
                                      if fp32))
