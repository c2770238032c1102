"""A Hyper-V-style VMBus paravirtual device stack with a Cython core."""

__version__ = "0.1.0"
