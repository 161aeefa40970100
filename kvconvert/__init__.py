"""kvconvert: convert a Hugging Face causal LM to fewer KV heads, as a stock checkpoint."""

__version__ = "0.1.0"
