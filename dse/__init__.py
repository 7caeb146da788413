"""dse: design-space exploration of number formats for low-precision deep-learning training."""

__version__ = "0.1.0"
