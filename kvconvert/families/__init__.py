"""Model families as data: where attention lives, how projections are stored, rotary and QK-norm, one registry."""

from __future__ import annotations

from transformers import PretrainedConfig

from kvconvert.errors import KVConvertError
from kvconvert.families.base import AttentionGeometry, Family, rotary_dim
from kvconvert.families.layouts import FalconGrouped, FusedQKV, Layout, Separate
from kvconvert.families.norms import QKNorm
from kvconvert.families.registry import FAMILIES, REFUSED

PROJECTIONS = ("q", "k", "v", "o")

__all__ = [
    "FAMILIES",
    "PROJECTIONS",
    "REFUSED",
    "AttentionGeometry",
    "FalconGrouped",
    "Family",
    "FusedQKV",
    "Layout",
    "QKNorm",
    "Separate",
    "family_for",
    "rotary_dim",
    "supported_architectures",
]


def supported_architectures() -> list[str]:
    return [arch for fam in FAMILIES for arch in fam.architectures]


def family_for(config: PretrainedConfig) -> Family:
    """The registered family of `config`, or one clear line saying why it cannot be converted."""
    archs = tuple(getattr(config, "architectures", None) or ())
    found = None
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs) or (not archs and config.model_type in fam.model_types):
            found = fam
            break
    if found is None:
        for arch in archs:
            if arch in REFUSED:
                raise KVConvertError(f"{arch} cannot be converted: {REFUSED[arch]}")
        name = ", ".join(archs) or config.model_type
        raise KVConvertError(f"unsupported model family {name}; supported: {', '.join(supported_architectures())}")
    reason = found.refuse(config) if found.refuse else None
    if reason:
        raise KVConvertError(f"{', '.join(archs) or config.model_type} cannot be converted: {reason}")
    return found
