"""Moved to `kvconvert.io.staging`; kept so older imports work."""

from kvconvert.io.staging import DEFERRED_SIGNALS, deferred_interrupts, swap_into_place, write_text

__all__ = ["DEFERRED_SIGNALS", "deferred_interrupts", "swap_into_place", "write_text"]
