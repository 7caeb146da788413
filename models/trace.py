"""The GEMMs a PyTorch model runs, found by running it: every module, functional call and attention.

One forward pass on a few samples runs under a torch dispatch mode, which sees each operation after
PyTorch has broken it down into its kernels: every `nn.Linear`, `nn.Conv*d`, `nn.MultiheadAttention`
(projections and both attention products, fused or not), `F.linear`, `torch.matmul`/`@`, `torch.bmm`,
`torch.einsum` and `F.scaled_dot_product_attention` reaches it as a matrix product (mm, addmm, bmm,
baddbmm), a convolution or a fused attention kernel. An operand that shares storage with a parameter is
a weight; the layer is named after that parameter (`fc.weight` -> `fc`), or else after the module that
ran it. The energy model derives the backward-data, backward-weight and update work of each forward
GEMM (see models.workloads.GemmLayer), so this records the forward shapes per sample. Recurrent
layers (nn.LSTM, nn.GRU, nn.RNN) run fused kernels: they are named in a warning, not priced.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.workloads import GemmLayer, Workload, matmul

aten = torch.ops.aten
TRACE_SAMPLES = 2
"""Samples the traced forward runs on (shapes are per sample, so two suffice to tell the batch apart)."""
_PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
_FUSED_ATTENTION = {getattr(aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(aten, name)}
_UNPRICED_WORDS = ("rnn", "lstm", "gru", "_int_mm", "_weight_int")
"""Kernels that hold GEMMs this tracer does not take apart (recurrent layers, integer matmuls): a model
that runs one gets a warning naming it, never a silent gap."""


def _weight_name(param_name: str) -> str:
    for suffix in (".weight", "_weight"):
        if param_name.endswith(suffix):
            return param_name[: -len(suffix)]
    return param_name


class _Recorder(TorchDispatchMode):
    """Records each GEMM-shaped kernel as a GemmLayer, named by weight or by the running module."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.samples = samples
        self.weights: dict[int, str] = {}
        for name, param in model.named_parameters():
            self.weights.setdefault(param.untyped_storage().data_ptr(), name)
        self.module_names = {id(module): name for name, module in model.named_modules()}
        self.leaves = {id(m) for m in model.modules() if not list(m.children()) and not list(m.parameters())}
        self.stack: list[nn.Module] = []
        self.layers: list[GemmLayer] = []
        self.used_weights: set[str] = set()
        self.calls: dict[str, int] = {}
        self.unpriced: set[str] = set()

    # the module that is running, from global forward hooks
    def push(self, module: nn.Module, *_: Any) -> None:
        self.stack.append(module)

    def pop(self, module: nn.Module, *_: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def _param(self, tensor: Any) -> str | None:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return None
        return self.weights.get(tensor.untyped_storage().data_ptr())

    def _name(self, base: str) -> str:
        self.calls[base] = self.calls.get(base, 0) + 1
        return base if self.calls[base] == 1 else f"{base}#{self.calls[base]}"

    def _module_name(self, suffix: str) -> str:
        module = next((m for m in reversed(self.stack) if id(m) in self.module_names), None)
        name = self.module_names.get(id(module), "") if module is not None else ""
        if module is not None and id(module) in self.leaves and suffix == "matmul":
            return name or suffix  # a parameter-free leaf such as models.layers.Matmul is the product
        return f"{name}.{suffix}" if name else suffix

    def _record(self, layer: GemmLayer, weight: str | None, suffix: str) -> None:
        if weight is not None:
            self.used_weights.add(weight)
        base = _weight_name(weight) if weight is not None else self._module_name(suffix)
        self.layers.append(dataclasses.replace(layer, name=self._name(base)))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            a, b = (args[1], args[2]) if packet in (aten.addmm, aten.baddbmm) else (args[0], args[1])
            a_weight, b_weight = self._param(a), self._param(b)
            grad = (a.requires_grad and a_weight is None) or (b.requires_grad and b_weight is None)
            layer = matmul("", tuple(a.shape), tuple(b.shape), self.samples, a_weight is not None,
                           b_weight is not None, grad)
            self._record(layer, b_weight or a_weight, "matmul")
        elif packet is aten.convolution:
            self._convolution(args, out)
        elif any(word in str(packet) for word in _UNPRICED_WORDS):
            self.unpriced.add(f"{self._module_name(str(packet).removeprefix('aten.'))} ({packet})")
        elif func in _FUSED_ATTENTION or packet in _FUSED_ATTENTION:
            q, k, v = args[:3]
            groups = max(1, math.prod(q.shape[:-2]) // self.samples)
            grad = q.requires_grad or k.requires_grad or v.requires_grad
            shared: dict[str, Any] = {"groups": groups, "b_is_weight": False, "needs_input_grad": grad,
                                      "kind": "attention"}
            self._record(GemmLayer("", m=q.shape[-2], k=q.shape[-1], n=k.shape[-2], **shared), None, "scores")
            self._record(GemmLayer("", m=q.shape[-2], k=k.shape[-2], n=v.shape[-1], **shared), None,
                         "context")
        return out

    def _convolution(self, args: tuple[Any, ...], out: Tensor) -> None:
        x, w = args[0], args[1]
        transposed, groups = bool(args[6]), int(args[8])
        kernel = math.prod(w.shape[2:])
        weight = self._param(w)
        grad = x.requires_grad
        shared: dict[str, Any] = {"groups": groups, "input_elems": x.numel() // self.samples,
                                  "b_is_weight": weight is not None, "needs_input_grad": grad, "kind": "conv"}
        if transposed:  # each input position scatters (c_in/g) x (c_out/g * kernel) products
            layer = GemmLayer("", m=math.prod(x.shape[2:]), k=w.shape[0] // groups, n=w.shape[1] * kernel,
                              **shared)
        else:
            layer = GemmLayer("", m=math.prod(out.shape[2:]), k=w.shape[1] * kernel, n=w.shape[0] // groups,
                              **shared)
        self._record(layer, weight, "conv")


def trace_model(model: nn.Module, inputs: Tensor, name: str, batch_size: int, optimizer: str = "sgd",
                description: str = "") -> Workload:
    """The GEMMs `model` runs on `inputs` (first dimension: samples), per sample, in call order.

    A layer whose operands need no gradient (the first one) gets needs_input_grad=False. Parameters
    that no GEMM uses as its weight, and are not such a weight's bias, go to extra_params. The model
    runs in eval mode and is left as it was; an error inside it becomes a ValueError naming the model.
    """
    samples = inputs.shape[0]
    recorder = _Recorder(model, samples)
    hooks = [nn.modules.module.register_module_forward_pre_hook(recorder.push),
             nn.modules.module.register_module_forward_hook(recorder.pop)]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad(), recorder:
            model(inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if recorder.unpriced:
        warnings.warn(f"{name}: not priced (GEMMs inside kernels the tracer does not take apart): "
                      f"{', '.join(sorted(recorder.unpriced))}", stacklevel=2)
    owned = set(recorder.used_weights)
    for weight in recorder.used_weights:
        stem = _weight_name(weight)
        owned |= {f"{stem}.bias", f"{stem}_bias"}
    extra = {param_name: p.numel() for param_name, p in model.named_parameters() if param_name not in owned}
    return Workload(name, tuple(recorder.layers), batch_size=batch_size, optimizer=optimizer,
                    extra_params=extra,
                    description=description or f"{type(model).__name__}, batch {batch_size}")
