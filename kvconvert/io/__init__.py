"""The IO toolkit: staged all-or-nothing outputs with locks (`staging`), one streaming safetensors/shard writer
(`shards`) and locked cache fills (`cache`). Every file kvconvert writes goes through here."""

from kvconvert.io.cache import locked_fill
from kvconvert.io.shards import SafetensorsWriter, ShardPlan, write_safetensors, write_shards
from kvconvert.io.staging import deferred_interrupts, staged, swap_into_place, write_text

__all__ = [
    "SafetensorsWriter",
    "ShardPlan",
    "deferred_interrupts",
    "locked_fill",
    "staged",
    "swap_into_place",
    "write_safetensors",
    "write_shards",
    "write_text",
]
