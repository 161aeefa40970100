"""Which parameters heal trains: attention projections, all non-embedding weights, or LoRA adapters (merged back)."""

from __future__ import annotations

import torch

from kvconvert.errors import KVConvertError
from kvconvert.families import Family

TRAIN_MODES = ("attn", "all", "lora")


def select_trainable(model, family: Family, mode: str, lora_rank: int = 16, seed: int = 0):
    """Freeze all but the chosen parameters; for `lora`, return a peft model with adapters on every linear layer
    (initialised from `seed`, so the same inputs and seed give the same healed model)."""
    if mode not in TRAIN_MODES:
        raise KVConvertError(f"unknown --train {mode}; choose {', '.join(TRAIN_MODES)}")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear")
        with torch.random.fork_rng(devices=[]):  # the adapters' random init, without touching the global RNG
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    attn_scope, projections = f"{family.attention}.", family.projection_modules()
    for name, p in model.named_parameters():
        if mode == "attn":
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            p.requires_grad_(f".{attn_scope}" in f".{name}" and module in projections)
        else:
            p.requires_grad_(id(p) not in embeddings)
    if not any(p.requires_grad for p in model.parameters()):
        raise KVConvertError(f"--train {mode} found no parameters to train in {type(model).__name__}")
    return model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merged(model):
    """The plain transformers model: LoRA adapters folded into the base weights, everything trainable again off."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
