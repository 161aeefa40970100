"""Greedy decode on a stock transformers `StaticCache`, one step replayed as a CUDA graph: how servers take the host
out of a decode step, so that its time is the GPU's (reading weights and the KV cache).

The step is the stock model's forward with a 4D additive mask kept on the device (the next slot is opened in place),
so nothing in it waits for the host: transformers' SDPA integration then runs a one-token query against the KV heads
without repeating them (`pack_gqa`). `StaticDecoder.step()` runs it eagerly (CPU, or the host-bound reference);
`StaticDecoder.graph()` captures it once on a GPU and `replay()` runs it.
"""

from __future__ import annotations

import torch

from kvconvert.compat import cache_kwargs


class StaticDecoder:
    """A static cache holding `context` tokens (random K/V, what a prefill leaves) with room for `steps` more."""

    def __init__(self, model, batch: int, context: int, steps: int, seed: int = 0):
        from transformers import StaticCache

        c, p = model.config, next(model.parameters())
        self.model, self.context, self.total = model, context, context + steps
        self.cache = StaticCache(config=c, max_cache_len=self.total)
        gen = torch.Generator(p.device).manual_seed(seed)
        shape = (batch, c.num_key_value_heads, context, c.head_dim)
        for layer in range(c.num_hidden_layers):
            k = torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype)
            v = torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype)
            self.cache.update(k, v, layer)
            del k, v
        self.mask = torch.full((batch, 1, 1, self.total), torch.finfo(p.dtype).min, device=p.device, dtype=p.dtype)
        self.mask[..., :context] = 0
        self.tok = torch.randint(0, c.vocab_size, (batch, 1), generator=gen, device=p.device)
        self.pos = torch.full((batch, 1), context, device=p.device, dtype=torch.long)
        self.slot = torch.tensor([context], device=p.device, dtype=torch.long)
        self.logits: torch.Tensor | None = None
        self._graph = None

    @torch.no_grad()
    def step(self) -> None:
        """One greedy token: open the next slot, run the model, feed its argmax back; all on the device."""
        self.mask.index_fill_(-1, self.slot, 0)
        out = self.model(
            input_ids=self.tok,
            position_ids=self.pos,
            attention_mask=self.mask,
            **cache_kwargs(self.cache),
            use_cache=True,
        )
        self.logits = out.logits[:, -1]
        self.tok.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.slot.add_(1)

    def graph(self, warmup: int = 2) -> None:
        """Capture one step as a CUDA graph (after `warmup` eager steps on a side stream, as CUDA graphs need)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.step()

    def replay(self) -> None:
        self._graph.replay()
