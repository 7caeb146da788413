"""NITI integer-only training (Wang et al., arXiv 2009.13108), emulated bit-exactly in PyTorch.

One module per part, as the reference's files divide it: ti_torch (the integer primitives of
niti/ti_torch.py), ti_loss (the integer cross-entropy of niti/ti_loss.py), exponents (how a
tensor's exponent travels), layers, optim (the loss module and the mu-bit update) and method (the
checks and the setup the training loop calls).

Every tensor is an integer mantissa m with |m| <= 2^BITWIDTH - 1 (int8: BITWIDTH = 7) and one
power-of-two exponent e per tensor, value m * 2^e. The emulation carries the value m * 2^e in an
ordinary float tensor (exact) and the exponent beside it, so that the shared training loop, ReLU,
pooling and reshapes run unchanged while every GEMM, shift and update follows the reference code
(wangmaolin/niti, Nov 2021) on exact integers. docs/niti.md says what is exact and what is not.

How the exponent travels:
- forward: a NITI layer returns a `NitiTensor` (a Tensor subclass with `niti_exp`). Ops that keep
  values on the same integer grid (ReLU, max-pooling, views, slicing) keep the tag; anything else
  returns a plain tensor, which the next NITI layer re-quantizes with TiFloatToInt8 (fresh exponent).
- backward: each NITI tensor also carries an `_ErrorSlot`. The NITI consumer of a tensor writes the
  exponent of the error it sends back into that slot; the producer reads it back in its own
  backward. With no (or several) NITI consumers the error is re-quantized with TiFloatToInt8.
  The autograd functions return the exponent and the slot as outputs beside the value.
- weights: each NITI layer holds a `NitiWeight` (the parameter, its fixed exponent, and the int32
  weight-gradient accumulator of the step, kept exactly as int64 (g32, exp)); `.grad` holds its
  value g32 * 2^exp in float. `NitiOptimizer` applies the mu-bit update to the NitiWeights.
"""

from dse.train.niti.exponents import NitiTensor
from dse.train.niti.layers import NitiConv, NitiEmbedding, NitiLinear, NitiMatmul, NitiWeight, weight_mantissa
from dse.train.niti.method import check_niti, convert_model, niti_copy_bits, niti_mu_for_epoch, niti_setup
from dse.train.niti.optim import NitiCrossEntropy, NitiOptimizer
from dse.train.niti.ti_loss import integer_ce_error
from dse.train.niti.ti_torch import (
    INT8_BITWIDTH,
    act_calc,
    float_to_int,
    grad_calc,
    int_clip,
    psto_shift,
    range_estimate,
    round_shift,
    sto_shift,
    weight_quant,
)

__all__ = ["INT8_BITWIDTH", "NitiConv", "NitiCrossEntropy", "NitiEmbedding", "NitiLinear", "NitiMatmul",
           "NitiOptimizer", "NitiTensor", "NitiWeight", "act_calc", "check_niti", "convert_model",
           "float_to_int", "grad_calc", "int_clip", "integer_ce_error", "niti_copy_bits", "niti_mu_for_epoch",
           "niti_setup", "psto_shift", "range_estimate", "round_shift", "sto_shift", "weight_mantissa",
           "weight_quant"]
