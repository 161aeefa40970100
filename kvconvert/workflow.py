"""Run a recipe: check everything cheap first (push access, model, heads, output), then calibrate -> compress ->
heal -> eval -> push, recording each step in the output's kvconvert.json and model card."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kvconvert import hub
from kvconvert.card import evaluation_section, update_record
from kvconvert.checkpoint import Checkpoint
from kvconvert.config import CalibrateConfig, CompressRequest, EvalRequest, HealRequest, PushRequest, SourceConfig
from kvconvert.errors import KVConvertError
from kvconvert.export import prepare_output
from kvconvert.io.staging import check_output_first
from kvconvert.modeling import resolve_device, resolve_dtype
from kvconvert.pipeline import CompressResult, run_compress
from kvconvert.preflight import check_source
from kvconvert.progress import Progress, Silent
from kvconvert.recipe import Recipe
from kvconvert.stats import CalibrationStats
from kvconvert.targets import parse_heads
from kvconvert.textdata import SELF

REUSED_KEYS = ("dataset", "samples", "seq_len", "seed", "text_field", "dtype")


@dataclass
class RecipeResult:
    output: Path
    compress: CompressResult
    evaluation: dict | None = None
    push: hub.PushResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


def calibration_request(recipe: Recipe) -> CalibrateConfig:
    """The recipe's calibrate section without its `stats` path."""
    return CalibrateConfig(**recipe.calibrate.model_dump(exclude={"stats"}))


def heal_request(recipe: Recipe) -> HealRequest | None:
    """The recipe's heal section as a request that heals the written output in place."""
    h = recipe.heal
    if h is None:
        return None
    fields = h.model_dump(exclude={"steps", "tokens"})
    budget = {"steps": h.steps, "tokens": None} if h.steps else {"tokens": h.tokens}
    return HealRequest(
        student=str(recipe.output),
        teacher=recipe.model,
        teacher_revision=recipe.revision,
        allow_pickle=recipe.allow_pickle,
        output=recipe.output,
        overwrite=True,
        max_shard_size=recipe.compress.max_shard_size,  # the heal rewrites the output: keep compress's shards
        **fields,
        **budget,
    )


def compress_request(recipe: Recipe, stats: Path | None) -> CompressRequest:
    """The recipe's model, output and compress section as one compress run (healing in place if asked)."""
    source = recipe.model_dump(include=set(SourceConfig.model_fields) | {"output", "overwrite"})
    return CompressRequest(
        **source,
        **recipe.compress.model_dump(exclude={"refine"}),
        refine=recipe.compress.refine,
        stats=stats,
        calibration=calibration_request(recipe),
        heal=heal_request(recipe),
    )


def preflight(recipe: Recipe, progress: Progress | None = None) -> Checkpoint:
    """Everything that can fail in seconds: push target and access, model, head count, output, source files."""
    if recipe.push:
        p = recipe.push
        hub.check_target(p.repo_id, p.revision, p.create_pr)
        hub.check_access(p.repo_id)
    check_output_first(recipe.output, recipe.model, overwrite=recipe.overwrite, directory=True)
    if (stats := recipe.calibrate.stats) is not None:
        out, kept = recipe.output.expanduser().resolve(), stats.expanduser().resolve()
        if kept == out or out in kept.parents:
            raise KVConvertError(
                f"calibrate.stats {stats} lies inside the output {recipe.output}, which the run replaces; "
                "keep the statistics outside it"
            )
    ckpt = recipe.resolve(progress)
    parse_heads(recipe.compress.heads, ckpt.family.geometry(ckpt.config))
    prepare_output(recipe.output, ckpt.path, recipe.overwrite)
    check_source(ckpt, require_tokenizer=not recipe.compress.allow_missing_tokenizer)
    return ckpt


def check_reusable(ckpt: Checkpoint, path: Path, req: CalibrateConfig) -> None:
    """Statistics at `path` may stand in for calibrating with `req` only if they are of this model and this text."""
    stats = CalibrationStats.load(path)
    stats.check_model(ckpt.fingerprint(), path)
    want = {
        "dataset": req.dataset,
        "samples": req.samples,
        "seq_len": req.seq_len,
        "seed": req.seed,
        "text_field": req.text_field,
        "dtype": str(resolve_dtype(req.dtype, resolve_device(req.device))).removeprefix("torch."),
    }
    for key in REUSED_KEYS:
        if stats.source.get(key) != want[key]:
            raise KVConvertError(
                f"{path} was calibrated with {key}={stats.source.get(key)!r}, the recipe asks {want[key]!r}; "
                "delete the file or point calibrate.stats elsewhere"
            )
    if req.dataset != SELF:  # the same name may now hold other text: compare the windows it gives (tokenizer only)
        from kvconvert.pipeline import request_windows
        from kvconvert.textdata import windows_digest

        if windows_digest(request_windows(ckpt, req)) != stats.source.get("tokens_sha256"):
            raise KVConvertError(
                f"{path} was calibrated on other text than {req.dataset} holds now; "
                "delete the file or point calibrate.stats elsewhere"
            )


def run_eval(req: EvalRequest, progress: Progress | None = None) -> dict:
    """`kvconvert eval` per `req`: the report of `kvconvert.evaluation.evaluate`."""
    from kvconvert.evaluation import evaluate

    return evaluate(req.model, **req.model_dump(exclude={"model", "cache", "cache_prompt"}), progress=progress)


def run_eval_cache(req: EvalRequest, progress: Progress | None = None) -> dict:
    """`kvconvert eval --cache`: the report of `kvconvert.evaluation.cached.evaluate_cache` on `req`'s text."""
    from kvconvert.checkpoint import resolve
    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.evaluation.perplexity import eval_windows
    from kvconvert.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype

    ignored = [
        flag for flag, given in (("--baseline", req.baseline), ("--runtime-batch", req.runtime_batch > 1)) if given
    ]
    if ignored:
        raise KVConvertError(
            f"--cache compares MODEL with its own full cache (one sequence per measurement); drop "
            f"{' and '.join(ignored)}, or run eval without --cache to compare MODEL with a baseline"
        )
    ckpt, dev = resolve(req.model, progress=progress), resolve_device(req.device)
    lm, tok = load_model(ckpt, dev, resolve_dtype(req.dtype, dev)), load_tokenizer(ckpt)
    windows = eval_windows(lm, tok, req.dataset, req.samples, req.seq_len, req.seed, 1, text_field=req.text_field)
    return evaluate_cache(
        lm,
        tok,
        req.cache,
        windows,
        req.contexts,
        new_tokens=req.new_tokens,
        prompt_fraction=req.cache_prompt,
        progress=progress,
    )


def run_recipe(recipe: Recipe, progress: Progress | None = None) -> RecipeResult:
    from kvconvert.pipeline import run_calibration

    progress = progress or Silent()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpt = preflight(recipe, progress)
    timings["preflight"] = time.perf_counter() - t0

    cal = calibration_request(recipe)
    stats_path = recipe.calibrate.stats
    if stats_path is not None:
        t0 = time.perf_counter()
        if stats_path.exists():
            check_reusable(ckpt, stats_path, cal)
            progress.log(f"reusing calibration statistics {stats_path}")
        else:
            run_calibration(ckpt, cal, stats_path, progress)
        timings["calibrate"] = time.perf_counter() - t0

    compressed = run_compress(compress_request(recipe, stats_path), progress)
    for stage, secs in compressed.timings.items():
        timings[stage] = timings.get(stage, 0.0) + secs
    update_record(recipe.output, recipe=recipe.model_dump(mode="json", exclude_none=True))
    result = RecipeResult(recipe.output, compressed, timings=timings)

    if recipe.matryoshka:
        from kvconvert.config.matryoshka import MatryoshkaRunRequest
        from kvconvert.matryoshka.run import run_matryoshka

        t0 = time.perf_counter()
        run = MatryoshkaRunRequest(model=str(recipe.output), output=recipe.output, **recipe.matryoshka.model_dump())
        run_matryoshka(run, progress, in_place_ok=True)  # the projections join the recipe's own output
        timings["matryoshka"] = time.perf_counter() - t0

    if recipe.eval:
        t0 = time.perf_counter()
        req = EvalRequest(model=str(recipe.output), baseline=str(ckpt.path), **recipe.eval.model_dump())
        report = run_eval(req, progress)
        update_record(recipe.output, evaluation=evaluation_section(report, recipe.model))
        result.evaluation = report
        timings["eval"] = time.perf_counter() - t0

    if recipe.profile:  # RazorAttention profile of the output, attached to it
        from kvconvert.config.profile import ProfileRunRequest
        from kvconvert.razor.run import run_profile

        t0 = time.perf_counter()
        out = recipe.output
        run_profile(
            ProfileRunRequest(
                model=str(out), output=out / "razor_profile.json", attach=True, **recipe.profile.model_dump()
            ),
            progress,
        )
        timings["profile"] = time.perf_counter() - t0

    if recipe.push:
        t0 = time.perf_counter()
        result.push = hub.push(PushRequest(directory=recipe.output, **recipe.push.model_dump()))
        timings["push"] = time.perf_counter() - t0
    return result
