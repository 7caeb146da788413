"""NITI as a training method for the shared loop: its checks and its setup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dse.errors import InputError
from dse.formats import get as get_format
from dse.train.config import TrainConfig, TrainingSetup
from dse.train.layers import Matmul
from dse.train.niti.layers import NitiConv, NitiEmbedding, NitiLinear, NitiMatmul, NitiWeight, SharedWeights
from dse.train.niti.optim import NitiCrossEntropy, NitiOptimizer

# ----------------------------------------------------------------------------------------------

_FORMAT_FIELDS = ("format", "weights", "activations", "gradients", "weight_grads")


def check_niti(config: TrainConfig) -> int:
    """NITI's BITWIDTH from the config's integer format (int(n) -> n - 1), after checking that the
    config can run under NITI at all; InputError otherwise."""
    given = {name: getattr(config, name) for name in _FORMAT_FIELDS if getattr(config, name) is not None}
    if not given:
        raise InputError("NITI needs an integer format such as format='int8', got none (fp32)")
    widths = set()
    for name, spec in given.items():
        fmt = get_format(spec)
        if fmt.family != "int":
            raise InputError(f"NITI needs an integer format, got {name}={spec!r} (family '{fmt.family}')")
        widths.add(fmt.bits)
    if len(widths) > 1:
        listed = ", ".join(f"{name}={spec!r}" for name, spec in given.items())
        raise InputError(f"NITI uses one integer width for every tensor, got {listed}")
    bits = widths.pop()
    if not 2 <= bits <= 16:
        raise InputError(f"NITI supports int2..int16, got int{bits} (format fields {given})")
    if not 1 <= config.niti_mu <= 31:
        raise InputError(f"niti_mu must be in 1..31 (bits of the integer update), got {config.niti_mu}")
    niti_copy_bits(config, bits)
    return bits - 1


def niti_copy_bits(config: TrainConfig, bits: int) -> int | None:
    """The width of NITI's integer weight accumulator (master_weights 'int16': int16), or None when
    the weights are updated in place (master_weights true or false: NITI keeps no float copy)."""
    master = config.master_weights
    if not isinstance(master, str):
        return None
    try:
        fmt = get_format(master)
    except ValueError as error:
        raise InputError(f"config master_weights: {str(error).splitlines()[0]}") from None
    copy_bits = fmt.bits
    if fmt.family != "int" or not bits < copy_bits <= 32:
        raise InputError(f"NITI keeps its weight accumulator as a wider integer (int{bits + 1}..int32, e.g. "
                         f"int16: the reference's 8 extra fraction bits), got master_weights {master!r}")
    return copy_bits


def niti_mu_for_epoch(mu: int, epoch: int, epochs: int) -> int:
    """The paper's regime (mu = 5, 4, 3 from epochs 0, 100, 150 of 200) scaled to `epochs`."""
    return mu - int(2 * epoch >= epochs) - int(4 * epoch >= 3 * epochs)


def convert_model(model: nn.Module, bitwidth: int, generator: torch.Generator) -> list[nn.Module]:
    """Swap Linear, Conv1d/2d/3d, Embedding and Matmul modules for NITI layers, in place.

    The NITI layers keep the original parameter objects; a layer applied at two places becomes a NITI
    layer at each, with one weight state. nn.MultiheadAttention is left alone (its projections are not
    called as modules). Returns the new layers in model order.
    """
    converted: list[nn.Module] = []
    shared: SharedWeights = {}

    def replacement(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear):
            return NitiLinear(child, bitwidth, generator, shared)
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return NitiConv(child, bitwidth, generator, shared)
        if isinstance(child, nn.Embedding):
            return NitiEmbedding(child, bitwidth, generator, shared)
        if isinstance(child, Matmul):
            return NitiMatmul(bitwidth)
        return None

    if replacement(model) is not None:
        raise InputError(f"NITI converts the layers inside a model; got a bare {type(model).__name__}")
    _replace_children(model, replacement, converted)
    return converted


def _replace_children(module: nn.Module, replacement: Callable[[nn.Module], nn.Module | None],
                      converted: list[nn.Module]) -> None:
    """Swap every child of `module` that `replacement` replaces, at every place (not named_children's
    first of each module: a layer applied twice is two NITI layers with one NitiWeight, where the
    second place would otherwise stay float), and look inside the others. A function of the module, not
    a closure of convert_model: a closure that calls itself is a reference cycle, which kept the
    converted layers and their weights alive until Python's cyclic collector ran."""
    for name, child in list(module._modules.items()):
        if child is None or isinstance(child, nn.MultiheadAttention):
            continue
        new = replacement(child)
        if new is None:
            _replace_children(child, replacement, converted)
        else:
            setattr(module, name, new)
            converted.append(new)


def niti_setup(model: nn.Module, config: TrainConfig, generator: torch.Generator) -> TrainingSetup:
    """Turn `model` into a NITI integer network in place; return its loss, optimizer and mu schedule.

    Every parameter outside a NITI layer (biases, LayerNorm, free-standing embeddings) is frozen;
    master_weights applies only as an integer accumulator ('int16'); lr, momentum, weight_decay,
    rounding and full_precision_layers do not apply.
    """
    bitwidth = check_niti(config)
    layers = convert_model(model, bitwidth, generator)
    weights: dict[int, NitiWeight] = {}
    for layer in layers:
        if isinstance(layer, (NitiLinear, NitiConv, NitiEmbedding)):
            weights.setdefault(id(layer.weight), layer.niti_weight)
    if not weights:
        raise InputError(f"NITI found no Linear, Conv or Embedding layer to train in {type(model).__name__}")
    for param in model.parameters():
        if id(param) not in weights:
            param.requires_grad_(False)
    optimizer = NitiOptimizer(list(weights.values()), mu=config.niti_mu, bitwidth=bitwidth,
                              copy_bits=niti_copy_bits(config, bitwidth + 1))
    start_mu, epochs = config.niti_mu, config.epochs

    def on_epoch_start(epoch: int) -> None:
        for group in optimizer.param_groups:
            group["mu"] = niti_mu_for_epoch(start_mu, epoch, epochs)

    # The reference evaluates at its training batch size (main.py, data.py: one BATCH_SIZE).
    return TrainingSetup(model=model, loss_fn=NitiCrossEntropy(bitwidth, generator), optimizer=optimizer,
                         on_epoch_start=on_epoch_start, eval_batch=config.batch_size)
