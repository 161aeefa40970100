"""The merge math: pure tensor functions, no IO."""
