"""RazorAttention: data-free retrieval-head profiling and the profile's storage (the runtime is kvconvert.runtime)."""
