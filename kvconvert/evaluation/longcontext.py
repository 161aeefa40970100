"""Long-context tasks for the cache runtimes: passkey retrieval and long-text perplexity through a cache, with
the prompt read at once (as `generate` does) or in chunks, and text scored as if decoded."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from kvconvert.compat import cache_kwargs

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_parts(tokenizer, context: int, depth: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, question) token ids, about `context` tokens in all: filler with the passkey sentence at relative
    `depth`, then the question that asks for it."""
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    intro, question, filler = ids(INTRO), ids(QUESTION), ids(FILLER)
    room = context - len(intro) - len(question) - len(needle.input_ids)
    body = (filler * (room // len(filler) + 1))[:room]
    cut = int(depth * room)
    cut -= cut % len(filler)  # at a sentence-group boundary
    return torch.tensor(intro + body[:cut] + needle.input_ids + body[cut:])[None], torch.tensor(question)[None]


def _on_model(model, ids: torch.Tensor) -> torch.Tensor:
    """`ids` on the device of `model`'s weights (windows and prompts are built on the CPU)."""
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed `ids` through `cache` in chunks (`chunk` <= 0: all at once); return every position's logits (float32),
    on the model's device (`ids` go there first)."""
    ids = _on_model(model, ids)
    chunk = chunk if chunk > 0 else ids.shape[1]
    out = [
        model(input_ids=ids[:, i : i + chunk], **cache_kwargs(cache)).logits.float()
        for i in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(out, dim=1)


@torch.no_grad()
def continuation_logits(model, ids: torch.Tensor, cache, chunk: int, prompt: int = 0) -> torch.Tensor:
    """Logits of `ids` read in `chunk`s; with `prompt`, its first `prompt` tokens are read at once as a prompt
    and the rest is scored through the cache's windows as if decoded (a razor cache switches to its "window"
    prompt attention; only its compensation token is read as each chunk found it)."""
    if not prompt:
        return prefill(model, ids, cache, chunk)
    head = prefill(model, ids[:, :prompt], cache, 0)
    if hasattr(cache, "set_prompt_attention"):
        cache.set_prompt_attention("window")
    return torch.cat([head, prefill(model, ids[:, prompt:], cache, chunk)], dim=1)


@torch.no_grad()
def greedy(
    model, ids: torch.Tensor, cache, chunk: int, new_tokens: int, then: torch.Tensor | None = None
) -> torch.Tensor:
    """Chunked prefill, then `new_tokens` greedy decode steps through the same cache. `then`: a second prompt read
    at once after `ids` is cached (a razor cache has cut its windowed heads by then), e.g. a question that arrives
    after the document, as in a chat's next turn or a reused prefix cache."""
    logits = prefill(model, ids, cache, chunk)[:, -1]
    if then is not None:
        logits = prefill(model, then, cache, 0)[:, -1]
    out = []
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1].float()
    return torch.cat(out, dim=1)


def ask_passkey(
    model, text: torch.Tensor, question: torch.Tensor, cache, chunk: int, new_tokens: int, after: bool = False
) -> torch.Tensor:
    """Greedy answer tokens to a passkey prompt: document and question read as one prompt (as `generate` does), or
    with `after` the question read as a second prompt once the document is cached (and a razor cache cut)."""
    if after:
        return greedy(model, text, cache, chunk, new_tokens, then=question)
    return greedy(model, torch.cat([text, question], dim=1), cache, chunk, new_tokens)


def random_key(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def nll(logits: torch.Tensor, ids: torch.Tensor, skip: int) -> tuple[float, int]:
    """Summed next-token NLL over positions after `skip`, and their count."""
    pred, target = logits[0, skip:-1], ids[0, skip + 1 :].to(logits.device)
    return float(F.cross_entropy(pred, target, reduction="sum")), target.numel()


def ppl(total: float, count: int) -> float:
    return math.exp(total / count)
