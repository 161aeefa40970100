"""MatryoshkaKV: post-RoPE KV moments, PCA bases, Cayley training, rate search, output (see docs/matryoshka.md)."""
