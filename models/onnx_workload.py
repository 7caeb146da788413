"""A workload read from an ONNX file (needs the optional `onnx` package: pip install 'dse[onnx]').

Every MatMul, Gemm, Conv and ConvTranspose node is a GEMM. Shapes come from ONNX shape inference
with an open batch dimension set to 1 (a fixed batch is divided out: shapes are per sample); where
inference leaves a dimension open (reshapes computed at run time), the graph is run once on zeros
with onnx's reference evaluator. An
operand computed from initializers only is a weight; the layer is named after it (`fc.weight` -> `fc`)
or, for an exporter's anonymous initializer, after the node (`/att/MatMul` -> `att.MatMul`).
Initializers that are no GEMM's weight (biases, norms, embeddings) go to extra_params.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

from dse.errors import InputError
from dse.models.workloads import GemmLayer, UnpricedWarning, Workload, layer_name_of, matmul, unique_names

_GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
_UNPRICED_OPS = ("Einsum", "MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv", "Attention",
                 "LSTM", "GRU", "RNN")
"""Products this reader does not take apart; a file that holds them gets a warning naming them."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise InputError("ONNX workloads need the onnx package: pip install 'dse[onnx]'") from None
    return onnx


def _node_name(node: Any, index: int) -> str:
    """'/att/MatMul_1' -> 'att' (the op's own name dropped; repeats get #2, #3 later)."""
    parts = [part for part in node.name.split("/") if part] if node.name else []
    if len(parts) > 1 and parts[-1].startswith(node.op_type):
        parts = parts[:-1]
    return ".".join(parts) or f"{node.op_type.lower()}{index}"


def _fix_batch(model: Any, batch: int = 1) -> int:
    """Every open dimension of a graph input becomes 1 (a length the file leaves open), or `batch` where
    it leads (the batch); returns the samples the graph then runs on: the first input's leading
    dimension (a file exported with a fixed batch keeps it, and shapes are divided by it)."""
    initializers = {init.name for init in model.graph.initializer}
    samples = 0
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        for index, dim in enumerate(dims):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.ClearField("dim_param")
                dim.dim_value = batch if index == 0 and len(dims) >= 2 else 1
        if not samples:
            samples = dims[0].dim_value if len(dims) >= 2 else 1
    return max(samples, 1)


def _shapes(onnx: Any, model: Any, needed: set[str]) -> dict[str, tuple[int, ...]]:
    """Static shapes of the `needed` tensors (inference first, one reference run for what it leaves open)."""
    shapes: dict[str, tuple[int, ...]] = {init.name: tuple(init.dims) for init in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:  # an inconsistent graph: onnx says which node
        raise InputError(f"shape inference failed: {str(error).splitlines()[0]}") from None
    for value in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(value.name, tuple(d.dim_value for d in dims))
    missing = sorted(name for name in needed if name not in shapes)
    if missing:
        import numpy as np
        from onnx.reference import ReferenceEvaluator

        initializers = {init.name for init in model.graph.initializer}
        feeds = {}
        for value in (v for v in model.graph.input if v.name not in initializers):
            tensor_type = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            feeds[value.name] = np.zeros([d.dim_value for d in tensor_type.shape.dim], dtype=dtype)
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in missing)
        try:
            values = ReferenceEvaluator(probe).run(missing, feeds)
        except Exception as error:
            raise InputError(f"cannot find the shapes of {missing[0]!r} and others: "
                             f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
        shapes.update({name: tuple(np.shape(value)) for name, value in zip(missing, values, strict=True)})
    return shapes


def _check_batch_follows(onnx: Any, doubled: Any, gemms: list[Any], from_input: set[str],
                         shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """With the open batch at 2 instead of 1, every GEMM on the input must do twice the work; a graph that
    fixes the batch inside (a Reshape to a constant, as torch.onnx.export writes `len(x)` or
    `x.reshape(2, ...)`) would otherwise be priced per sample at the export's batch times too much."""
    outputs = {node.output[0] for node in gemms if any(name in from_input for name in node.input)}
    try:
        twice = _shapes(onnx, doubled, outputs)
    except InputError:
        twice = {}
    fixed = sorted(name for name in outputs
                   if math.prod(twice.get(name, ())) != 2 * math.prod(shapes[name]))
    if fixed:
        raise InputError(f"{where}: the batch axis is open but {fixed[0]!r} does not follow it (the graph "
                         "fixes the batch, e.g. a Reshape exported from len(x)); export it without "
                         "dynamic axes, at the batch it was traced with")


def load_onnx(path: str | Path, batch_size: int = 32) -> Workload:
    """The GEMMs of the ONNX graph at `path`, per sample, in graph order."""
    onnx = _onnx()
    path = Path(path).expanduser()
    where = f"ONNX workload {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    try:
        model = onnx.load(str(path))
    except Exception as error:
        raise InputError(f"{where}: not a readable ONNX model ({type(error).__name__})") from None
    open_batch = onnx.ModelProto()
    open_batch.CopyFrom(model)
    samples = _fix_batch(model)
    graph = model.graph
    tensor = onnx.TensorProto
    real = (tensor.FLOAT, tensor.FLOAT16, tensor.BFLOAT16, tensor.DOUBLE)
    params = {init.name: math.prod(init.dims) for init in graph.initializer if init.data_type in real}
    constant = set(params) | {init.name for init in graph.initializer}
    from_input = {value.name for value in graph.input if value.name not in constant}
    carries_grad = set(params)
    roots: dict[str, set[str]] = {name: {name} for name in params}  # tensor -> the parameters it comes from
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or all(name in constant for name in inputs):
            constant.update(node.output)
        if any(name in from_input for name in inputs):
            from_input.update(node.output)
        if any(name in carries_grad for name in inputs):
            carries_grad.update(node.output)
        sources = set().union(*(roots.get(name, set()) for name in inputs)) if inputs else set()
        for output in node.output:
            roots[output] = sources
    unpriced = sorted({node.op_type for node in graph.node if node.op_type in _UNPRICED_OPS})
    if unpriced:
        warnings.warn(f"{where}: {', '.join(unpriced)} nodes are not priced (only MatMul, Gemm, Conv and "
                      "ConvTranspose are read; an einsum written as matmuls counts)", UnpricedWarning,
                      stacklevel=2)
    gemms = [node for node in graph.node if node.op_type in _GEMM_OPS]
    if not gemms:
        raise InputError(f"{where}: no MatMul, Gemm or Conv node")
    needed = {name for node in gemms for name in (*node.input[:2], node.output[0])}
    try:
        shapes = _shapes(onnx, model, needed)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    if _fix_batch(open_batch, 2) != samples:
        _check_batch_follows(onnx, open_batch, gemms, from_input, shapes, where)
    layers: list[GemmLayer] = []
    owned: set[str] = set()
    for index, node in enumerate(gemms):
        a, b = node.input[0], node.input[1]
        a_weight = a in constant and a not in from_input and bool(roots.get(a))
        b_weight = b in constant and b not in from_input and bool(roots.get(b))
        weight_of = b if b_weight else a if a_weight else None
        repeated = False  # a weight an earlier GEMM took (a layer applied again, a tied weight): stored once
        if weight_of is not None:
            repeated = bool(roots.get(weight_of)) and roots[weight_of] <= owned
            owned |= roots.get(weight_of, set())
        owned_weight = weight_of is not None and weight_of in params and not weight_of.startswith("onnx::")
        named = weight_of if owned_weight else None
        name = layer_name_of(named) if named else _node_name(node, index)
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        grad = (a in carries_grad and not a_weight) or (b in carries_grad and not b_weight)
        b_grad = True
        if not a_weight and not b_weight:  # two activations: each gradient only where needed
            grad, b_grad = a in carries_grad, b in carries_grad
        a_shape, b_shape, out_shape = shapes[a], shapes[b], shapes[node.output[0]]
        if node.op_type in ("MatMul", "Gemm"):
            if node.op_type == "Gemm":
                a_shape = a_shape[::-1] if attrs.get("transA") else a_shape
                b_shape = b_shape[::-1] if attrs.get("transB") else b_shape
            layer = matmul(name, a_shape, b_shape, samples, a_weight, b_weight, grad, b_grad)
        else:
            groups = int(attrs.get("group", 1))
            kernel = math.prod(b_shape[2:])
            common: dict[str, Any] = {"groups": groups, "input_elems": math.prod(a_shape) // samples,
                                      "b_is_weight": b_weight, "needs_input_grad": grad, "kind": "conv"}
            if node.op_type == "ConvTranspose":  # weight [c_in, c_out/g, *kernel]
                layer = GemmLayer(name, m=math.prod(a_shape[2:]), k=b_shape[0] // groups,
                                  n=b_shape[1] * kernel, **common)
            else:  # weight [c_out, c_in/g, *kernel]
                layer = GemmLayer(name, m=math.prod(out_shape[2:]), k=b_shape[1] * kernel,
                                  n=b_shape[0] // groups, **common)
        layers.append(dataclasses.replace(layer, repeated_weight=repeated))
    layers = unique_names(layers)
    extra = {name: count for name, count in params.items() if name not in owned}
    return Workload(graph.name or path.stem, tuple(layers), batch_size=batch_size, extra_params=extra,
                    description=f"ONNX graph {path.name}, batch {batch_size}")
