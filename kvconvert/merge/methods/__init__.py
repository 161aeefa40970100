"""Merge methods as plug-ins: one module here per method, each defining `METHOD` (its loss, its merge and its
batched loss). A new method is one file here plus a test; `kvconvert.merge.registry` finds it by its file."""

from kvconvert.merge import registry
from kvconvert.merge.problem import GroupProblem, HeadMerge, MergeLoss, Method

METHODS: dict[str, Method] = {name: registry.get(name) for name in registry.names()}

__all__ = ["METHODS", "GroupProblem", "HeadMerge", "MergeLoss", "Method"]
