"""Proxy models (trainable) and workload shapes (for the energy model)."""
