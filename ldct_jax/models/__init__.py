"""Flax Linen models, all built on the shared conv layers in ``layers``."""
