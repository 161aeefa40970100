"""One config per stage: calibrate, refine, compress, heal, eval, push. Each holds its choices and defaults once.

A recipe section is the stage's settings; a request adds where to read and write (model, output). The CLI
builds its options from these fields, so defaults and choices live only here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kvconvert.config.base import (
    CALIBRATION,
    EVALUATION,
    INPUT,
    MERGE,
    OUTPUT,
    REFINE,
    SAFETY,
    TRAINING,
    StageConfig,
    setting,
)
from kvconvert.merge import registry

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Method = Literal[registry.names()]
Grouping = Literal["search", "adjacent"]
RefineInputs = Literal["sequential", "original"]
TrainMode = Literal["attn", "all", "lora"]

DEVICE_HELP = "auto, cpu, cuda or cuda:N."
DTYPE_HELP = "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."
DATASET_HELP = "wikitext|c4|fineweb-edu|pile-val, a Hub dataset id, a local file, or `self`."
TEXT_FIELD_HELP = "Text column of a table dataset (default: `text`, else its only text column)."


def device_field(panel: str) -> Any:
    return setting("auto", DEVICE_HELP, panel, metavar="DEVICE")


def dtype_field(panel: str) -> Any:
    return setting("auto", DTYPE_HELP, panel, metavar="DTYPE")


def max_shard_size_field() -> Any:
    return setting("5GB", "Largest safetensors shard (KB, MB, GB or TB: 500MB, 5GB).", OUTPUT, metavar="SIZE")


SHARD_SIZE = re.compile(r"\s*\d+(\.\d*)?\s*[KMGT]B\s*", re.IGNORECASE)
"""What huggingface_hub's shard split reads (`parse_size_to_int`): a number and one of KB, MB, GB, TB."""


def check_shard_size(v: Any) -> Any:
    """Refuse a size the shard writer cannot read now, not after calibration and refinement have run."""
    if isinstance(v, str) and not SHARD_SIZE.fullmatch(v):
        raise ValueError(f"{v!r} is not a size; write a number and KB, MB, GB or TB (500MB, 5GB)")
    return v


def output_field(metavar: str = "DIR") -> Any:
    return setting(..., "Where to write the result.", OUTPUT, short="-o", metavar=metavar)


def overwrite_field(help: str = "Replace a non-empty output directory.") -> Any:
    return setting(False, help, OUTPUT)


class SourceConfig(StageConfig):
    """The model to read and what reading it may do."""

    model: str = setting(..., "Checkpoint directory, Hub id, .gguf file, or `smollm2` (built-in, offline).", INPUT)
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of MODEL.", INPUT, metavar="REV")
    allow_pickle: bool = setting(False, "Read pytorch_model*.bin weights (with torch.load(weights_only=True)).", SAFETY)
    trust_remote_code: bool = setting(
        False, "Let transformers run the checkpoint's own Python code (auto_map).", SAFETY
    )

    def resolve(self, progress=None):
        """The local `Checkpoint` for `model` (see `kvconvert.checkpoint.resolve`; `progress`: a `Progress`)."""
        from kvconvert.checkpoint import resolve

        return resolve(
            self.model,
            revision=self.revision,
            allow_pickle=self.allow_pickle,
            trust_remote_code=self.trust_remote_code,
            progress=progress,
        )


class CalibrateConfig(StageConfig):
    """Calibration text and how much of it (`kvconvert calibrate`)."""

    positional = ("dataset", "samples", "seq_len", "batch_size", "seed", "text_field", "device", "dtype")

    dataset: str = setting("self", DATASET_HELP, CALIBRATION, metavar="SRC")
    samples: int = setting(128, "Number of token windows.", CALIBRATION, ge=1, metavar="N")
    seq_len: int = setting(2048, "Tokens per window.", CALIBRATION, ge=2, metavar="N")
    batch_size: int = setting(1, "Windows per forward pass.", CALIBRATION, ge=1, metavar="N")
    seed: int = setting(0, "Seed for `--dataset self` sampling.", CALIBRATION, metavar="N")
    text_field: str | None = setting(None, TEXT_FIELD_HELP, CALIBRATION, metavar="COL")
    device: str = device_field(CALIBRATION)
    dtype: Dtype = dtype_field(CALIBRATION)
    offload_dir: Path | None = setting(
        None, "Keep the calibration hidden states in a file here instead of in memory.", CALIBRATION, metavar="DIR"
    )


class CalibrateRequest(SourceConfig, CalibrateConfig):
    """A whole `kvconvert calibrate` run: the model, the text, and the statistics file to write."""

    output: Path = output_field("FILE")
    overwrite: bool = overwrite_field("Replace an existing statistics file.")


class RefineConfig(StageConfig):
    """Layer-local refinement after the merge (`kvconvert.refine`); off when steps == 0."""

    steps: int = setting(0, "Adam steps per layer fitting each merged attention block (0: off).", REFINE, ge=0)
    lr: float = setting(0.02, "Refinement step size, relative to each weight's RMS.", REFINE, gt=0)
    samples: int = setting(16, "Calibration windows used to refine.", REFINE, ge=1)
    inputs: RefineInputs = setting(
        "sequential", "sequential (refined earlier layers) or original (original inputs).", REFINE
    )
    batch_size: int = Field(4, ge=1, exclude=True, json_schema_extra={"cli": False})


class CompressConfig(StageConfig):
    """How to merge (a recipe's `compress` section)."""

    heads: str = setting(..., "Fraction of current KV heads (0.25) or a count (1, 4).", MERGE, metavar="H")
    method: Method = setting(registry.DEFAULT, "Merge method.", MERGE)
    grouping: Grouping = setting("search", "Head grouping.", MERGE)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    verify: bool = setting(
        True, "Check the written output (tensors, layer-wise logits) before it replaces anything.", SAFETY
    )
    reload_check: bool = setting(
        False, "Also reload the whole output with stock transformers (two fp32 model copies).", SAFETY
    )
    max_shard_size: str = max_shard_size_field()
    allow_missing_tokenizer: bool = setting(False, "Write the output even if MODEL has no tokenizer files.", SAFETY)

    _shard_size = field_validator("max_shard_size")(check_shard_size)

    @field_validator("heads", mode="before")
    @classmethod
    def _heads(cls, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError("heads must be a count (8) or a fraction of the current KV heads (0.25)")
        return str(v)


class HealConfig(StageConfig):
    """Distillation from the original (a recipe's `heal` section; see `kvconvert heal`)."""

    datasets: list[str] = setting(
        ["self"],
        "Training text (repeatable): a local file, dataset alias or Hub id; `self` samples the teacher to fill "
        "the token budget. Without `self`, short text is repeated in new orders.",
        TRAINING,
        flag="dataset",
        metavar="SRC",
        min_length=1,
    )
    text_field: str | None = setting(None, TEXT_FIELD_HELP, TRAINING, metavar="COL")
    tokens: int | None = setting(100_000, "Distillation tokens (rounded up to whole steps).", TRAINING, ge=1)
    steps: int | None = setting(None, "Optimizer steps (overrides --tokens).", TRAINING, ge=1)
    seq_len: int = setting(512, "Tokens per window.", TRAINING, ge=2)
    batch_size: int = setting(2, "Windows per step and process.", TRAINING, ge=1)
    lr: float = setting(3e-4, "Peak learning rate (AdamW, warm-up then cosine).", TRAINING, gt=0)
    train: TrainMode = setting("attn", "Trainable parameters.", TRAINING)
    lora_rank: int = setting(16, "LoRA rank for --train lora.", TRAINING, ge=1)
    kl_weight: float = setting(1.0, "Weight of KL(teacher ‖ student).", TRAINING, ge=0)
    ce_weight: float = setting(0.0, "Weight of next-token cross-entropy.", TRAINING, ge=0)
    temperature: float = setting(1.0, "Softmax temperature of the KL term.", TRAINING, gt=0)
    seed: int = setting(0, "Seed for data order and `self` sampling.", TRAINING)
    device: str = device_field(TRAINING)
    dtype: Dtype = dtype_field(TRAINING)
    checkpoint_every: int = setting(50, "Steps between saved states.", OUTPUT, ge=1)

    @model_validator(mode="after")
    def _weights(self) -> HealConfig:
        if self.kl_weight + self.ce_weight == 0:
            raise ValueError("--kl-weight and --ce-weight must be >= 0 and not both 0")
        return self


class HealRequest(HealConfig):
    """A whole `kvconvert heal` run: the settings plus student, teacher and output."""

    positional = ("student", "teacher", "output")

    student: str = setting(..., "The converted checkpoint to heal (e.g. the output of `compress`).", INPUT)
    teacher: str = setting(..., "The original model the student was converted from.", INPUT, metavar="MODEL")
    teacher_revision: str | None = setting(
        None, "Hub revision (branch, tag or commit) of --teacher.", INPUT, metavar="REV"
    )
    allow_pickle: bool = setting(False, "Read pytorch_model*.bin weights (with torch.load(weights_only=True)).", SAFETY)
    output: Path = output_field()
    warmup: float = setting(0.05, "Share of the steps spent warming the learning rate up.", TRAINING, ge=0, lt=1)
    state_dir: Path | None = setting(None, "Where states go (default: OUTPUT.heal-state).", OUTPUT, metavar="DIR")
    resume: bool = setting(False, "Continue an interrupted run from its last state.", OUTPUT)
    overwrite: bool = overwrite_field("Replace a non-empty output (or the student).")
    keep_state: bool = setting(False, "Keep the state directory after success.", OUTPUT)
    max_shard_size: str = max_shard_size_field()
    verify: bool = setting(True, "Reload the output with stock transformers and compare logits.", SAFETY)

    _shard_size = field_validator("max_shard_size")(check_shard_size)


class CompressRequest(SourceConfig, CompressConfig):
    """A whole `kvconvert compress` run: model, settings, calibration (or saved statistics) and output."""

    positional = ("model", "heads", "output")

    output: Path = output_field()
    overwrite: bool = overwrite_field()
    stats: Path | None = setting(
        None, "Statistics from `kvconvert calibrate` (else calibrate now).", CALIBRATION, metavar="FILE"
    )
    protect_retrieval: Path | None = setting(
        None, "A `kvconvert profile` JSON: keep its retrieval heads apart in the grouping.", MERGE, metavar="FILE"
    )
    calibration: CalibrateConfig = Field(default_factory=CalibrateConfig)
    heal: HealRequest | None = None
    """Heal the written output in place right after the merge (student = output, teacher = model)."""


class EvalConfig(StageConfig):
    """Perplexity of a model (and a baseline) on the same held-out tokens (a recipe's `eval` section)."""

    dataset: str = setting("self", DATASET_HELP, EVALUATION, metavar="SRC")
    samples: int = setting(32, "Number of token windows.", EVALUATION, ge=1, metavar="N")
    seq_len: int = setting(512, "Tokens per window.", EVALUATION, ge=2, metavar="N")
    batch_size: int = setting(1, "Windows per forward pass.", EVALUATION, ge=1, metavar="N")
    seed: int = setting(1, "Seed for `--dataset self` (differs from calibration's 0).", EVALUATION, metavar="N")
    text_field: str | None = setting(None, TEXT_FIELD_HELP, EVALUATION, metavar="COL")
    device: str = device_field(EVALUATION)
    dtype: Dtype = dtype_field(EVALUATION)


class EvalRequest(EvalConfig):
    """A whole `kvconvert eval` run: the settings plus the models and the runtime probes."""

    positional = ("model",)

    model: str = SourceConfig.model_fields["model"]
    baseline: str | None = setting(None, "Compare with this model on the same tokens.", INPUT, metavar="MODEL")
    contexts: list[int] = setting(
        [],
        "Also measure decode tokens/s and peak memory at these context lengths (512,2048).",
        "Runtime",
        metavar="N,N",
    )
    new_tokens: int = setting(32, "Tokens generated per runtime measurement.", "Runtime", ge=2)
    repeats: int = setting(3, "Runtime repeats (median, after one warm-up).", "Runtime", ge=1)
    runtime_batch: int = setting(1, "Sequences per runtime measurement.", "Runtime", ge=1)
    cache: str | None = setting(
        None,
        "Evaluate through a cache runtime, e.g. razor[:PROFILE] or matryoshka:DIR, against the full cache.",
        "Runtime",
        metavar="KIND[:ARG]",
    )
    cache_prompt: float = setting(
        0.5,
        "With --cache: read this fraction of each window at once as a prompt, score the rest as if decoded.",
        "Runtime",
        ge=0,
        lt=1,
        metavar="F",
    )

    @field_validator("contexts", mode="before")
    @classmethod
    def _contexts(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = [int(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError("a comma-separated list of token counts, e.g. 512,2048,8192") from None
        if any(isinstance(x, int) and x < 1 for x in v or ()):
            raise ValueError("context lengths must be positive")
        return v


class PushConfig(StageConfig):
    """Where on the Hub (a recipe's `push` section; see `kvconvert push`)."""

    repo_id: str = setting(..., "NAMESPACE/NAME of the Hub model repository (created if missing).", OUTPUT)
    private: bool = setting(False, "Create the repository private (refused if it is public).", OUTPUT)
    revision: str | None = setting(None, "Branch to push to (created if missing).", OUTPUT, metavar="BRANCH")
    commit_message: str | None = setting(None, "Commit title (default: what was converted).", OUTPUT, metavar="TEXT")
    create_pr: bool = setting(False, "Open a pull request instead of pushing to a branch.", OUTPUT)
    overwrite: bool = overwrite_field("Replace files in the repository that kvconvert did not upload.")


class PushRequest(PushConfig):
    """A whole `kvconvert push` run: the settings plus the directory to upload."""

    positional = ("directory", "repo_id", "private", "revision", "commit_message", "create_pr")

    directory: Path = setting(..., "A converted checkpoint directory (the output of `compress`).", INPUT, metavar="DIR")
