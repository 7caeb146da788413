"""The names the energy model tallies by: the passes of a training iteration and the units that spend
the energy. Plain names, so that the store and the reports can read energy columns without the
tables and datapaths that compute them."""

PASSES: tuple[str, ...] = ("forward", "backward_data", "backward_weight", "update")
UNITS: tuple[str, ...] = ("multiply", "conversion", "accumulation", "update", "memory")
