"""The number-format zoo: `get(spec)` returns a format object; `ZOO` lists the named formats."""

from dse.formats import block, fixed, floating, lns, p3109, posit  # noqa: F401  (each module registers its family)
from dse.formats.base import ROUNDINGS, NumberFormat, Scaling, check_rounding, round_to_integer, shift_round
from dse.formats.spec import get

ZOO: tuple[str, ...] = (
    "fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1",
    "int8", "int4", "fixed(16,8)",
    "posit(8,0)", "posit(16,1)", "posit8", "posit16", "posit32",
    "lns8", "lns(8,gamma=4)", "lns(6,gamma=2)", "lns(16,gamma=256)",
    "p3109(8,3)", "p3109(8,4)",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8",
    "mxfp4(block=16)", "nvfp4",
)

__all__ = ["ROUNDINGS", "ZOO", "NumberFormat", "Scaling", "check_rounding", "get", "round_to_integer",
           "shift_round"]
