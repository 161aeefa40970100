"""Evaluation: perplexity, KV-cache accounting, decode throughput and peak memory, base vs converted."""

from kvconvert.evaluation.report import evaluate

__all__ = ["evaluate"]
