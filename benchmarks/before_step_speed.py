"""The training step as it ran before the step-speed changes, for baseline rows beside today's in
one process: block-scaled operands quantized one axis per call, each GEMM's in its turn
(`NumberFormat.quantize_along`'s loop of `quantize`, nothing computed ahead in the forward), and
NITI's weight update in the reference's int64 arithmetic (`reference_step_weight_`). The same
values bit for bit (tests/formats/test_quantize_along.py, tests/train/test_niti_update.py), so
only the time differs.

    with per_axis_quantize_and_int64_update():
        step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dse.formats.base import NumberFormat
from dse.formats.block import BlockFormat
from dse.train.layers import BlockQuantizer
from dse.train.niti import optim as niti_optim
from dse.train.niti import stacked as niti_stacked


@contextlib.contextmanager
def per_axis_quantize_and_int64_update() -> Iterator[None]:
    saved = (BlockFormat.quantize_along, BlockQuantizer.__init__, niti_optim.step_weight_,
             niti_stacked.step_weight_)
    original_init = BlockQuantizer.__init__

    def init_drawing(self: BlockQuantizer, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.draws = True  # as a drawing rounding: each GEMM quantizes its operands in its turn

    BlockFormat.quantize_along = NumberFormat.quantize_along  # type: ignore[method-assign]
    BlockQuantizer.__init__ = init_drawing  # type: ignore[method-assign]
    niti_optim.step_weight_ = niti_stacked.step_weight_ = niti_optim.reference_step_weight_
    try:
        yield
    finally:
        (BlockFormat.quantize_along, BlockQuantizer.__init__, niti_optim.step_weight_,  # type: ignore[method-assign]
         niti_stacked.step_weight_) = saved
