"""The RazorAttention profile stage's config (a recipe's `profile` section; see `kvconvert profile`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kvconvert.config.base import INPUT, OUTPUT, StageConfig, setting
from kvconvert.config.stages import Dtype, device_field, dtype_field, output_field, overwrite_field

PROFILE, RUNTIME = "Profile", "Runtime"
Scoring = Literal["ablation", "ablation-drop", "echo-induction"]
PromptAttention = Literal["full", "window"]


class ProfileConfig(StageConfig):
    """Data-free retrieval-head profiling on repeated random tokens and the runtime's window rule."""

    scoring: Scoring = setting(
        "ablation-drop",
        "ablation: greedy, by the copy loss of windowing heads; ablation-drop: by the loss of windowing one "
        "head alone; echo-induction: attention scores.",
        PROFILE,
    )
    block: int = setting(384, "Random tokens per block (the block is repeated).", PROFILE, ge=16, metavar="N")
    repeats: int = setting(2, "Copies of the block.", PROFILE, ge=2, metavar="N")
    seeds: int | None = setting(
        None, "Random sequences (default: 1 for ablation, 3 for echo-induction).", PROFILE, ge=1, metavar="N"
    )
    retrieval: float = setting(0.21, "Ablation: fraction of KV heads kept in full.", PROFILE, ge=0, le=1)
    rounds: int = setting(2, "Ablation: greedy rounds.", PROFILE, ge=1, metavar="N")
    pool: int = setting(30, "Ablation: heads re-scored in each later round (0: all).", PROFILE, ge=0, metavar="N")
    probe_sinks: int = setting(
        4, "Ablation: sink tokens of a windowed head while profiling (the cache keeps --sinks).", PROFILE, ge=0
    )
    induction: float = setting(0.14, "echo-induction: fraction of KV heads by induction.", PROFILE, ge=0, le=1)
    echo: float = setting(0.01, "echo-induction: fraction of KV heads by echo.", PROFILE, ge=0, le=1)
    sinks: int = setting(32, "First tokens every windowed head keeps.", RUNTIME, ge=0, metavar="N")
    window_floor: int = setting(256, "Smallest recent window of a windowed head.", RUNTIME, ge=1, metavar="N")
    window_fraction: float = setting(0.15, "Recent window as a fraction of the context.", RUNTIME, ge=0, le=1)
    prompt_attention: PromptAttention = setting(
        "full",
        "What a prompt read in one forward pass sees in windowed heads: everything (full; RazorAttention's order: "
        "the cache is compressed after the prompt) or each token's own window (window).",
        RUNTIME,
    )
    device: str = device_field(PROFILE)
    dtype: Dtype = dtype_field(PROFILE)

    def seed_count(self) -> int:
        return self.seeds or (3 if self.scoring == "echo-induction" else 1)

    def runtime_rule(self) -> dict:
        """The window rule stored with the profile for the runtime."""
        rule = {"sinks": self.sinks, "window_floor": self.window_floor, "window_fraction": self.window_fraction}
        return rule | {"compensation": True, "prompt_attention": self.prompt_attention}


class ProfileRunRequest(ProfileConfig):
    """A whole `kvconvert profile` run: the settings plus the model and the profile file."""

    model: str = setting(..., "Checkpoint directory, Hub id, .gguf file, or `smollm2` (built-in, offline).", INPUT)
    output: Path = output_field("FILE")
    overwrite: bool = overwrite_field("Replace an existing profile file.")
    attach: bool = setting(False, "Also store the profile in MODEL (a checkpoint directory).", OUTPUT)
