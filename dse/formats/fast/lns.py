"""The fast path of LNS nearest rounding: lookup tables on the float's bit pattern.

`LNS.nearest_index` (lns.py) defines the nearest index of |x| as the number of ties below it
(searchsorted over the float64 ties). Here that count is found with integer operations on x's bit
pattern (see _Lookup): one table lookup on its top bits, whose entry turns into the index when x's
low bits are added, then one lookup of the value; on the CPU over slices that stay in cache, with a
per-tensor scale divided and multiplied slice by slice (the same products as whole-tensor ones).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dse.formats.base import constant
from dse.formats.fast import FastPath, enabled, reference_only_active, register
from dse.formats.fast.slices import fitted, for_slices, slice_scratch
from dse.formats.lns import lns_grid

if TYPE_CHECKING:
    from dse.formats.lns import LNS

LOOKUP = register(FastPath(
    name="lns-lookup",
    reference="LNS.round_reference (nearest_index: searchsorted over the float64 ties)",
    operation="round_unscaled",
    formats=("lns8", "lns(8,gamma=4,scale=none)", "lns(6,gamma=2,scale=none)", "lns(8,underflow=saturate)",
             "lns(12,gamma=8,scale=none)", "lns(16,gamma=256,scale=none)", "lns(16,gamma=128,scale=none)",
             "lns(16,gamma=16384,scale=none,underflow=saturate)"),
    dtypes=(torch.float32, torch.float64),
))
SCALED_LOOKUP = register(FastPath(
    name="lns-scaled-lookup",
    reference="NumberFormat.round_by_scale: x / scale rounded by LNS.round_reference, times scale",
    operation="quantize",
    formats=("lns8", "lns(8,underflow=saturate)", "lns(12,gamma=16,pow2=1)",
             "lns(16,gamma=1024,underflow=saturate)"),
    dtypes=(torch.float32, torch.float64),
    code_space="scaled",
))


def round_nearest(fmt: LNS, x: Tensor, scale: Tensor | None = None) -> Tensor | None:
    """fmt.round_unscaled(x, "nearest") (or x / scale rounded, times scale) by table lookup; None
    inside reference_only()."""
    if reference_only_active() or not enabled(LOOKUP if scale is None else SCALED_LOOKUP):
        return None
    return _round_nearest(fmt, x, scale)


def fmt_lookup(fmt: LNS, dtype: torch.dtype, device: torch.device) -> _Lookup:
    return _lookup(fmt.bits, fmt.gamma, fmt.underflow, dtype, device)


# Formats whose lookup table would have at most this many entries with the sign bit in the key get one.
_SIGNED_TABLE = 2**18



class _Lookup(NamedTuple):
    """Nearest rounding by table lookup (a float's bit pattern B orders like its magnitude).

    The index of |x| is the number of tie_bits below B. Buckets of B that share their top bits
    (sign, exponent and log2(gamma)+1 mantissa bits: key = B >> shift) are narrower than the gap
    between two ties, so at most one tie falls in a bucket. Per bucket, `table` holds (the index at
    the bucket's start << shift) + (2^shift - 1 - the tie's offset in the bucket), or that index
    << shift where no tie falls in it: adding B's low bits then carries into bit `shift` exactly
    when B lies above the tie, so (table[key] + low bits) >> shift is the index.

    `signed` tables (where that is at most _SIGNED_TABLE keys) have an entry for every key, the
    sign bit's included, less the key's bucket start modulo 2^width, so that adding the whole of B
    (wrapping) adds its low bits: one pass less. Index top_index + 2 + i stands for -values[i], so
    one lookup gives the signed result, for NaN and +-inf as well (their buckets lie above the
    finite ones) and for zero (underflow=saturate's tie between 0 and min_positive lies between
    B = 0 and B = 1). Otherwise the table covers the keys of the magnitudes from the bucket below
    the smallest non-zero tie, which stands for all smaller ones, to the bucket past the last tie,
    `ceiling`, to which x is clamped, then one bucket for NaN; the sign is copied afterwards.
    """

    table: Tensor  # int32 (float32) or int64 (float64), on the device
    values: Tensor  # the grid's values (as _Grid.values), then their negations where signed
    signed: bool
    ceiling: float  # inf where signed, as first_key and last_key are 0: unused
    # Scalars of the table's dtype and device (a tensor operand costs less than a Python int).
    shift: Tensor
    low_mask: Tensor  # 2^shift - 1
    key_mask: Tensor  # the bits of a key, where signed; else all bits but the sign
    first_key: Tensor
    last_key: Tensor



def _bucket_entries(ties: Tensor, start: Tensor, shift: int, bits: int, gamma: int) -> Tensor:
    """The table entries (see _Lookup) of the buckets of bit patterns from `start` (int64)."""
    index = torch.searchsorted(ties, start)  # the index of B = start, #(ties < start)
    low_mask = (1 << shift) - 1
    tie = ties[index.clamp(max=ties.numel() - 1)] - start  # where the next tie lies, if in the bucket
    if bool((torch.searchsorted(ties, start + low_mask) > index + (tie < low_mask)).any()):
        raise ArithmeticError(f"two ties of lns({bits},gamma={gamma}) share a bucket")
    return (index << shift) + low_mask - tie.clamp(max=low_mask)


@functools.cache
def _lookup(bits: int, gamma: int, underflow: str, dtype: torch.dtype, device: torch.device) -> _Lookup:
    grid = lns_grid(bits, gamma, underflow, dtype, torch.device("cpu"))
    int_dtype = grid.tie_bits.dtype
    ties = grid.tie_bits.to(torch.int64)  # ascending
    width = torch.iinfo(int_dtype).bits
    # Ties are 2^(1/gamma) apart, more than a bucket (2^-(log2(gamma)+1) of its octave) in the log domain.
    shift = (23 if dtype == torch.float32 else 52) - gamma.bit_length()
    top = 2 ** (bits - 1) - 1

    scalar = functools.partial(constant, dtype=int_dtype, device=device)

    if 2 ** (width - shift) <= _SIGNED_TABLE:
        table = _bucket_entries(ties, torch.arange(2 ** (width - 1 - shift)) << shift, shift, bits, gamma)
        table = torch.cat([table, table + ((top + 2) << shift)])
        # Less each key's bucket start B0 = key << shift, modulo 2^width (unsigned numpy arithmetic
        # wraps by definition): adding B itself then adds B - B0, its low bits.
        starts = np.arange(table.numel(), dtype=np.uint64) << np.uint64(shift)
        wrapped = (table.numpy().astype(np.uint64) - starts) & np.uint64(2**width - 1)
        unsigned = {32: np.uint32, 64: np.uint64}[width]
        table = torch.from_numpy(wrapped.astype(unsigned).view({32: np.int32, 64: np.int64}[width]))
        values = torch.cat([grid.values, -grid.values])
        return _Lookup(table.to(device), values.to(device), True, torch.inf, scalar(shift),
                       scalar((1 << shift) - 1), scalar(2 ** (width - shift) - 1), scalar(0), scalar(0))
    lowest = int(torch.count_nonzero(ties <= 0))  # the index of every tiny non-zero magnitude
    first_key = (int(ties[lowest]) >> shift) - 1  # every B below this bucket's end has that index
    ceiling_key = (int(ties[top - 1]) >> shift) + 1  # every finite B from this bucket on has the top index
    table = _bucket_entries(ties, torch.arange(first_key + 1, ceiling_key + 1) << shift, shift, bits, gamma)
    table = torch.cat([torch.tensor([lowest << shift]), table, torch.tensor([(top + 1) << shift])])
    ceiling = float(torch.tensor([ceiling_key << shift]).to(int_dtype).view(dtype))
    return _Lookup(table.to(int_dtype).to(device), grid.values.to(device), False, ceiling, scalar(shift),
                   scalar((1 << shift) - 1), scalar(2 ** (width - 1 - shift) - 1), scalar(first_key),
                   scalar(ceiling_key + 1))


def _nearest_index(fmt: LNS, x: Tensor, lookup: _Lookup, index: Tensor, scratch: Tensor,
                   scale: Tensor | None = None, key: Tensor | None = None) -> Tensor:
    """Write the index of x (or of x / scale) rounded to nearest to `index`; 1-d, all the same size.

    Signed tables give the signed index (see _Lookup), others that of |x|. `scratch` (x's dtype)
    is spare space, and so is `key` (index's dtype), needed with a scale: without one, the key
    goes to scratch and the low bits come from x itself (only those of values clamped above
    differ, and they fall in buckets without a tie).
    """
    if scale is not None:
        x = torch.div(x, scale, out=scratch)
    low = x.view(lookup.table.dtype)
    if not lookup.signed:
        x = torch.clamp(x, -lookup.ceiling, lookup.ceiling, out=scratch)  # +-inf too; NaN stays
    bits = x.view(low.dtype)
    if scale is None:
        key = scratch.view(bits.dtype)
    elif key is None:
        key = torch.empty_like(bits)
    torch.bitwise_right_shift(bits, lookup.shift, out=key)
    key &= lookup.key_mask  # the sign goes, or the key of a negative x moves past the positive ones
    if not lookup.signed:
        key.clamp_(lookup.first_key, lookup.last_key).sub_(lookup.first_key)
    torch.index_select(lookup.table, 0, key, out=index)
    if lookup.signed:  # the entry less the bucket's start, plus B: wraps to entry + low bits
        index += low
    else:
        index += torch.bitwise_and(low, lookup.low_mask, out=key)
    index >>= lookup.shift
    if fmt.underflow == "saturate" and not lookup.signed:  # only 0 goes to zero
        torch.minimum(index, torch.bitwise_and(low, torch.iinfo(low.dtype).max, out=key), out=index)
    return index

def _round_nearest(fmt: LNS, x: Tensor, scale: Tensor | None = None) -> Tensor:
    """x (float32 or float64) rounded to nearest, or x / scale rounded and multiplied by scale.

    On the CPU this runs over cache-sized slices (`for_slices`). The result doubles
    as scratch space. The grid values are multiplied by the scale before the lookup, or the
    looked-up values after it where x has fewer elements than the grid (the same products).
    """
    if x.dtype == torch.float32 and fmt._float32_subnormals:
        return _round_nearest_in_float64(fmt, x, scale)
    flat = x.detach().reshape(-1)  # 1-d slices: index_select takes a 1-d index
    lookup = fmt_lookup(fmt, x.dtype, x.device)
    scale_after = scale is not None and flat.numel() < lookup.values.numel()
    values = lookup.values if scale is None or scale_after else lookup.values * scale
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # In cache per slice: x, the result, the index and, with a scale, the key.
    buffers = 3 if scale is None else 4
    index = slice_scratch(flat, lookup.table.dtype, buffers)
    key = None if scale is None else torch.empty_like(index)

    def round_slice(part: Tensor, result: Tensor) -> None:
        part_index, part_key = fitted(index, part), None if key is None else fitted(key, part)
        _nearest_index(fmt, part, lookup, part_index, result, scale, part_key)
        torch.index_select(values, 0, part_index, out=result)
        if not lookup.signed:
            result.copysign_(part)

    for_slices(flat, out.view(-1), round_slice, buffers)
    return out.mul_(scale) if scale is not None and scale_after else out

def _round_nearest_in_float64(fmt: LNS, x: Tensor, scale: Tensor | None) -> Tensor:
    """Float32 rounding for grids with float32-subnormal codes (no float32 table: its buckets would
    hold several ties): the index from the float64 table (x / scale, rounded in float32, is exact
    in float64), then the float32 grid value, times the scale in float32."""
    y = x.detach() if scale is None else x.detach() / scale
    flat = y.reshape(-1).double()
    lookup = fmt_lookup(fmt, torch.float64, x.device)
    index = torch.empty(flat.shape, dtype=lookup.table.dtype, device=x.device)
    _nearest_index(fmt, flat, lookup, index, torch.empty_like(flat))
    values = fmt._grid(torch.float32, x.device).values
    out = torch.cat([values, -values]).index_select(0, index) if lookup.signed else \
        values.index_select(0, index).copysign_(y.reshape(-1))
    out = out.view(x.shape)
    return out if scale is None else out.mul_(scale)

