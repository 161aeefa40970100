"""The compression plan: which old heads feed each new KV head, and the maps that merge them."""

from __future__ import annotations

from dataclasses import dataclass

from kvconvert.merge.problem import HeadMerge


@dataclass(frozen=True)
class NewHead:
    """One new KV head: the old query heads it serves (in new order), the old KV heads it merges, the maps."""

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    merge: HeadMerge


@dataclass(frozen=True)
class LayerPlan:
    heads: tuple[NewHead, ...]

    @property
    def query_order(self) -> list[int]:
        """Old query-head index at each new query position."""
        return [i for h in self.heads for i in h.query_heads]

    def retained(self, part: str) -> float:
        """Share of the (method-weighted) key or value energy the merge keeps, in [0, 1]."""
        loss = sum(getattr(h.merge, f"{part}_loss") for h in self.heads)
        total = sum(getattr(h.merge, f"{part}_total") for h in self.heads)
        return 1.0 - loss / total if total > 0 else 1.0


@dataclass(frozen=True)
class CompressionPlan:
    method: str
    grouping: str
    num_kv_heads_before: int
    num_kv_heads_after: int
    layers: tuple[LayerPlan, ...]

    def layer(self, i: int) -> LayerPlan:
        """Layer `i`'s plan (the interface `overlap.PendingPlan` shares)."""
        return self.layers[i]

    def summary(self) -> dict:
        """JSON-ready description: groups and retained energy per layer."""
        return {
            "method": self.method,
            "grouping": self.grouping,
            "num_key_value_heads": {"before": self.num_kv_heads_before, "after": self.num_kv_heads_after},
            "layers": [
                {
                    "layer": i,
                    "groups": [list(h.kv_heads) for h in lp.heads],
                    "query_heads": [list(h.query_heads) for h in lp.heads],
                    "key_energy_retained": round(lp.retained("key"), 6),
                    "value_energy_retained": round(lp.retained("value"), 6),
                }
                for i, lp in enumerate(self.layers)
            ],
        }
