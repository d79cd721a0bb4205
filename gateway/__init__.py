"""sorami-gateway: the exactly-once gateway between the Sorami app and its generator backend."""

__version__ = "0.1.0"
