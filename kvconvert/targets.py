"""Parse `--heads`: a fraction of the current KV heads (0.25) or an absolute count (1, 4)."""

from __future__ import annotations

from kvconvert.errors import KVConvertError
from kvconvert.families import AttentionGeometry


def valid_counts(geom: AttentionGeometry) -> list[int]:
    """KV-head counts a model can be converted to: divisors of the query-head count below the current count."""
    return [n for n in range(1, geom.num_kv_heads) if geom.num_heads % n == 0]


def parse_heads(spec: str, geom: AttentionGeometry) -> int:
    """Target KV-head count for `spec`, or a one-line error listing the valid values."""
    valid = valid_counts(geom)
    listing = ", ".join(map(str, valid)) or "none (the model already has one KV head per group it can form)"
    where = f"{geom.num_kv_heads} KV heads and {geom.num_heads} query heads"
    try:
        value = float(spec)
    except ValueError:
        raise KVConvertError(f"--heads {spec!r} is not a number; valid counts for {where}: {listing}") from None
    if 0 < value < 1:
        count = value * geom.num_kv_heads
        if abs(count - round(count)) > 1e-6:
            raise KVConvertError(
                f"--heads {spec} keeps {count:g} of {geom.num_kv_heads} KV heads; valid counts: {listing}"
            )
        n = round(count)
    elif value >= 1 and value == int(value):
        n = int(value)
    else:
        raise KVConvertError(f"--heads {spec} is neither a fraction in (0, 1) nor a count; valid counts: {listing}")
    if n not in valid:
        reason = "is not lower than" if n >= geom.num_kv_heads else "does not divide"
        ref = f"the current {geom.num_kv_heads}" if n >= geom.num_kv_heads else f"the {geom.num_heads} query heads"
        raise KVConvertError(f"--heads {spec}: {n} KV heads {reason} {ref}; valid counts for {where}: {listing}")
    return n
