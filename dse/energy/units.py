"""The names the energy model tallies by: the passes of a training iteration and the units that spend
the energy. Plain names, so that the store and the reports can read energy columns without the
tables and datapaths that compute them."""

PASSES: tuple[str, ...] = ("forward", "recompute", "backward_data", "backward_weight", "update")
"""`recompute`: a forward GEMM run again in the backward (activation checkpointing)."""
UNITS: tuple[str, ...] = ("multiply", "conversion", "accumulation", "update", "memory")
