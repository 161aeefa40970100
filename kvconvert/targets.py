"""Parse `--heads`: an absolute count of KV heads (`4`) or a fraction of the current ones (`0.25`, `1/4`).

The rule: a plain integer is a count; anything with a `.` or a `/` is a fraction of the current KV-head count, in
(0, 1]. So `1` is one KV head, while `1.0` and `1/1` keep all of them and are refused as not lower, and `4.0` is a
fraction above 1 (write `4` for a count). Fractions are exact (`1/3` of 12 heads is 4; `0.33` of 12 is refused).
"""

from __future__ import annotations

import re
from fractions import Fraction

from kvconvert.errors import KVConvertError
from kvconvert.families import AttentionGeometry

COUNT = re.compile(r"\d+")
FRACTION = re.compile(r"\d+/0*[1-9]\d*|\d*\.\d+|\d+\.\d*")


def valid_counts(geom: AttentionGeometry) -> list[int]:
    """KV-head counts a model can be converted to: divisors of the query-head count below the current count."""
    return [n for n in range(1, geom.num_kv_heads) if geom.num_heads % n == 0]


def parse_heads(spec: str, geom: AttentionGeometry) -> int:
    """Target KV-head count for `spec`, or a one-line error listing the valid values."""
    valid = valid_counts(geom)
    listing = ", ".join(map(str, valid)) or "none (the model already has one KV head per group it can form)"
    where = f"{geom.num_kv_heads} KV heads and {geom.num_heads} query heads"
    text = str(spec).strip()
    if COUNT.fullmatch(text):
        n = int(text)
    elif FRACTION.fullmatch(text):
        frac = Fraction(text)
        if not 0 < frac <= 1:
            raise KVConvertError(
                f"--heads {spec} is a fraction outside (0, 1] (write a whole number for a count); valid counts for "
                f"{where}: {listing}"
            )
        count = frac * geom.num_kv_heads
        if count.denominator != 1:
            raise KVConvertError(
                f"--heads {spec} keeps {float(count):.4g} of {geom.num_kv_heads} KV heads, not a whole number; valid "
                f"counts: {listing}"
            )
        n = int(count)
    else:
        raise KVConvertError(
            f"--heads {spec!r} is neither a count (4) nor a fraction (0.25, 1/4); valid counts for {where}: {listing}"
        )
    if n not in valid:
        reason = "is not lower than" if n >= geom.num_kv_heads else "does not divide"
        ref = f"the current {geom.num_kv_heads}" if n >= geom.num_kv_heads else f"the {geom.num_heads} query heads"
        if n == 0:
            reason, ref = "is", "no KV head at all"
        raise KVConvertError(f"--heads {spec}: {n} KV heads {reason} {ref}; valid counts for {where}: {listing}")
    return n
