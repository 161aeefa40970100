"""MatryoshkaKV: exactness at full rate, cache/masked equivalence, real cache bytes, moments, orthogonal training,
rate search and the command's output."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.heal.data import text_windows
from kvconvert.heal.objective import kl_divergence
from kvconvert.matryoshka.moments import collect_kv_moments
from kvconvert.matryoshka.projections import (
    Projections,
    full_rates,
    load_projections,
    orthogonality_error,
    pca_bases,
    save_projections,
)
from kvconvert.matryoshka.search import (
    candidate_swaps,
    cut_cost,
    mask_gradients,
    refine_rates,
    score,
    teacher_logits,
)
from kvconvert.matryoshka.train import TrainConfig, train_projections
from kvconvert.modeling import load_tokenizer
from kvconvert.runtime.matryoshka import MatryoshkaRuntime, matryoshka_runtime
from kvconvert.runtime.matryoshka_attention import HeadProjections, attention_modules
from kvconvert.textdata import iter_texts
from tests.tiny import DEVICES, make_model

_register()
LAYERS, KV, D = 2, 2, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("mk"), "llama", heads=4, kv_heads=KV, head_dim=D, layers=LAYERS)


def fresh(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_projections(seed: int = 0) -> Projections:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(LAYERS, KV, D, D, generator=g))[0]
    value = torch.linalg.qr(torch.randn(LAYERS, KV, D, D, generator=g))[0]
    return Projections(basis, value, full_rates(LAYERS, KV, D), full_rates(LAYERS, KV, D))


MIXED_K = torch.tensor([[4, 12], [8, 8]])
MIXED_V = torch.tensor([[16, 4], [2, 8]])


def ids_for(model, n=2, t=14, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_rate_reproduces_the_original_logits_with_and_without_the_cache(tiny):
    model = fresh(tiny)
    ids = ids_for(model)
    ref = model(ids).logits
    rt = MatryoshkaRuntime(random_projections())
    rt.attach(model)
    assert model.config._attn_implementation == "matryoshka"
    assert torch.allclose(model(ids, use_cache=False).logits, ref, atol=1e-5)
    cache = rt.new_cache(model, 2)
    first = model(ids[:, :9], past_key_values=cache, use_cache=True).logits
    rest = model(ids[:, 9:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([first, rest], 1), ref, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_cached_decoding_at_mixed_rates_matches_the_masked_full_pass_and_really_cuts(tiny, device):
    """On every device there is: the runtime's projections (made on the CPU) follow the model's device."""
    model = fresh(tiny).to(device)
    ids = ids_for(model, seed=1).to(device)
    ref = model(ids).logits
    rt = MatryoshkaRuntime(random_projections().with_rates(MIXED_K, MIXED_V))
    rt.attach(model)
    masked = model(ids, use_cache=False).logits
    cache = rt.new_cache(model, 2)
    steps = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
    for t in range(6, ids.shape[1]):  # token by token, as generate() decodes
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1), masked, atol=1e-5)
    assert (masked - ref).abs().max() > 1e-2  # the cut changes the model: the check above is not vacuous


def test_cached_rate_groups_follow_the_bases_to_another_device():
    """CPU-checkable form of the GPU case below: groups cut on one device are not reused once the bases moved."""
    p = random_projections()
    hp = HeadProjections(p.key_basis[0], p.value_basis[0], MIXED_K[0], MIXED_V[0])
    assert hp.groups(torch.float32)[0].key_basis.device.type == "cpu"
    hp.to("meta")
    assert all(g.key_basis.device.type == "meta" and g.heads.device.type == "meta" for g in hp.groups(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_a_model_moved_after_a_forward_pass_uses_projections_on_its_new_place(tiny, device):
    """The per-rate groups cut from the bases are cached; moving (or casting) the model must not reuse stale ones."""
    model = fresh(tiny)
    rt = MatryoshkaRuntime(random_projections().with_rates(MIXED_K, MIXED_V))
    rt.attach(model)
    ids = ids_for(model, seed=2)
    want = model(ids, use_cache=False).logits.double()
    model.to(device=device, dtype=torch.float64)
    got = model(ids.to(device), use_cache=False).logits
    groups = attention_modules(model)[0].matryoshka.groups(torch.float64)
    assert got.dtype == torch.float64 and groups[0].key_basis.device.type == device
    assert torch.allclose(got.cpu(), want, atol=1e-4)


@torch.no_grad()
def test_cache_tensor_bytes_equal_the_computed_size_after_generate(tiny):
    model = fresh(tiny)
    rt = MatryoshkaRuntime(random_projections().with_rates(MIXED_K, MIXED_V))
    rt.attach(model)
    cache = rt.new_cache(model, 3)
    model.generate(ids_for(model, 3, 5), past_key_values=cache, max_new_tokens=7, do_sample=False, pad_token_id=0)
    tokens = cache.get_seq_length()
    assert tokens == 11
    kept = int(MIXED_K.sum() + MIXED_V.sum())
    assert cache.nbytes() == rt.kv_bytes(tokens, 3) == tokens * 3 * kept * 4
    stored = {(tuple(t.shape[1::2])) for layer in cache.layers for t in layer.group_keys + layer.group_values}
    assert max(s[1] for s in stored) <= D and (1, 2) in stored  # no head padded to full width: value rate 2 kept


@torch.no_grad()
def test_collected_moments_are_those_of_the_post_rope_keys_the_cache_stores(tiny, text_a):
    model = fresh(tiny)
    windows = text_windows(load_tokenizer(str(tiny)), iter_texts(str(text_a)), 12, 3)
    moments = collect_kv_moments(model, windows, batch_size=2)
    cache = model(windows, use_cache=True).past_key_values
    keys = torch.stack([layer.keys.double() for layer in cache.layers])  # (L, B, h, T, D), after RoPE
    expect = torch.einsum("lbhtd,lbhte->lhde", keys, keys)
    assert moments.tokens == windows.numel()
    assert torch.allclose(moments.keys, expect, rtol=1e-6, atol=1e-6)
    basis = pca_bases(moments.keys / moments.tokens)
    energy = torch.einsum("lhdr,lhde,lher->lhr", basis.double(), moments.keys, basis.double())
    assert (energy[..., :-1] >= energy[..., 1:] - 1e-6).all()  # columns by descending variance
    assert orthogonality_error(basis) < 1e-5


def test_training_changes_the_bases_and_keeps_them_orthogonal(tiny, text_a):
    model = fresh(tiny)
    windows = text_windows(load_tokenizer(str(tiny)), iter_texts(str(text_a)), 16, 4)
    init = random_projections(3)
    errors = []

    def check(step, heads):
        with torch.no_grad():
            errors.extend(orthogonality_error(b) for h in heads for b in h.bases())

    res = train_projections(model, init, windows, TrainConfig(steps=4, batch_size=2, lr=0.05), 4, on_step=check)
    assert len(errors) == 4 * LAYERS * 2 and max(errors) < 1e-5
    assert orthogonality_error(res.projections.key_basis) < 1e-5
    assert (res.projections.key_basis - init.key_basis).abs().max() > 1e-3
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_candidate_swaps_pair_the_cheapest_giver_with_the_most_promising_taker():
    rates = torch.full((LAYERS, KV, 2), 8)
    rates[0, 0, 0] = 12  # topped up: can give back to 8 (costs[8]), cannot take (no costs[12])
    costs = {4: torch.ones(LAYERS, KV, 2), 8: torch.ones(LAYERS, KV, 2)}  # cut 8 -> 4, cut 12 -> 8
    costs[4][1, 1, 1] = 0.1  # cheap to cut from 8 to 4
    costs[8][0, 1, 0] = 5.0  # growing 8 -> 12 promises most
    frozen = torch.zeros(LAYERS, KV, 2, dtype=torch.bool)
    best = candidate_swaps(rates, costs, 4, frozen, 4)
    flat = lambda layer, h, k: (layer * KV + h) * 2 + k  # noqa: E731
    assert best[0][1:] == (flat(1, 1, 1), flat(0, 1, 0)) and best[0][0] == pytest.approx(0.1 - 5.0)
    assert all(est < 0 and g != t for est, g, t in best)
    assert flat(0, 0, 0) not in {t for _, _, t in best}  # a unit one step above r0 never takes
    frozen[0, 1, 0] = True
    assert flat(0, 1, 0) not in {t for _, _, t in candidate_swaps(rates, costs, 4, frozen, 4)}


def test_mask_gradients_match_finite_differences_and_cut_cost_is_a_trapezoid(tiny, text_a):
    model = fresh(tiny).double()
    windows = text_windows(load_tokenizer(str(tiny)), iter_texts(str(text_a)), 12, 3)
    proj = random_projections(1).with_rates(MIXED_K, MIXED_V)
    MatryoshkaRuntime(proj).attach(model)
    ref = teacher_logits(model, windows)
    g = mask_gradients(model, proj, windows, ref, chunk=2)
    assert g.shape == (LAYERS, KV, 2, D)
    direction = torch.randn(LAYERS, KV, 2, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dims = torch.arange(D)
    hard = torch.stack([dims < MIXED_K[..., None], dims < MIXED_V[..., None]], dim=2).double()

    def kl_at(masks):
        for i, m in enumerate(model.model.layers):
            m.self_attn.matryoshka.soft_masks = (masks[i, :, 0], masks[i, :, 1])
        try:
            with torch.no_grad():
                return float(kl_divergence(model(windows, use_cache=False).logits, ref))
        finally:
            for m in model.model.layers:
                m.self_attn.matryoshka.soft_masks = None

    assert kl_at(hard) == pytest.approx(score(model, proj, windows, ref), rel=1e-9)
    eps = 0.02  # some buffers stay float32: smaller steps drown in round-off
    numeric = (kl_at(hard + eps * direction) - kl_at(hard - eps * direction)) / (2 * eps)
    assert float((g * direction).sum()) == pytest.approx(numeric, rel=0.02)
    assert float((g * direction.flip(-2)).sum()) != pytest.approx(numeric, rel=0.2)  # keys/values not swapped
    assert torch.allclose(cut_cost(g, g, 4, 4), -g[..., 4:8].sum(-1))


def test_refine_rates_keeps_the_budget_and_never_loses_to_its_uniform_start(tiny, text_a):
    model = fresh(tiny)
    windows = text_windows(load_tokenizer(str(tiny)), iter_texts(str(text_a)), 12, 4)
    proj = random_projections(2)
    found = refine_rates(model, proj, windows, 0.5, 4, evals=6)
    assert found.projections.fraction() == 0.5
    assert found.kl <= found.uniform_kl and found.tried <= 6
    rates = torch.stack([found.projections.key_rates, found.projections.value_rates])
    assert rates.min() >= 4 and rates.max() <= 12  # within one step of the uniform 8
    assert len(found.moves) == int((rates != 8).sum()) // 2
    ref = teacher_logits(model, windows)
    assert score(model, found.projections, windows, ref) == pytest.approx(found.kl)
    topped = refine_rates(model, proj, windows, 0.6, 4, evals=0)  # 0.6 * 16 = 9.6: uniform 8, topped up
    assert 0.5 < topped.projections.fraction() <= 0.6 and topped.tried == 0
    by_ce = refine_rates(model, proj, windows, 0.5, 4, evals=3, objective="ce")
    assert by_ce.kl <= by_ce.uniform_kl and by_ce.uniform_kl > 1  # next-token CE of a random tiny model: ~log V
    keys_kept = refine_rates(model, proj, windows, 0.75, 4, evals=2, values_only=True).projections
    assert (keys_kept.key_rates == D).all() and keys_kept.fraction() == 0.75


def test_projection_file_round_trip(tmp_path):
    proj = random_projections().with_rates(MIXED_K, MIXED_V)
    save_projections(tmp_path / "matryoshka.safetensors", proj, {"budget": 0.5})
    back, info = load_projections(tmp_path)
    assert info == {"budget": 0.5}
    assert torch.equal(back.key_basis, proj.key_basis) and torch.equal(back.value_rates, proj.value_rates)


def test_cli_writes_projections_and_record_and_the_runtime_loads_them(tiny, text_a, tmp_path):
    out = tmp_path / "out"
    args = ["matryoshka", str(tiny), "--output", str(out), "--dataset", str(text_a), "--budget", "0.5"]
    args += ["--samples", "4", "--heldout", "2", "--seq-len", "16", "--steps", "2", "--rate-step", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    section = json.loads((out / "kvconvert.json").read_text())["matryoshka"]
    assert section["kept_fraction"] <= 0.5 and section["train"]["steps"] == 2
    search = section["search"]  # the searched rates are kept only if a real forward confirms they beat uniform
    assert section["heldout_kl"] == min(search["uniform_kl"], search["searched_kl"])
    assert (out / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    model = fresh(out)
    rt = matryoshka_runtime(model, str(out))
    assert rt.projections.fraction() == section["kept_fraction"]
    cache = rt.new_cache(model, 1)
    model.generate(ids_for(model, 1, 4), past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert cache.nbytes() == rt.kv_bytes(cache.get_seq_length(), 1)


def test_a_recipe_matryoshka_section_adds_projections_to_the_compressed_output(tiny, text_a, tmp_path):
    from kvconvert.recipe import parse_recipe
    from kvconvert.workflow import run_recipe

    recipe = parse_recipe(
        {
            "model": str(tiny),
            "output": str(tmp_path / "out"),
            "calibrate": {"dataset": str(text_a), "samples": 4, "seq_len": 16, "device": "cpu"},
            "compress": {"heads": 1},
            "matryoshka": {"datasets": [str(text_a)], "samples": 4, "heldout": 1, "seq_len": 16, "steps": 1},
        },
        "test",
    )
    run_recipe(recipe)
    proj, _ = load_projections(tmp_path / "out")
    assert proj.shape == (LAYERS, 1, D) and proj.fraction() <= 0.5
    assert json.loads((tmp_path / "out" / "kvconvert.json").read_text())["matryoshka"]["budget"] == 0.5


@torch.no_grad()
def test_a_values_only_cut_folds_exactly_into_a_stock_v_proj(tiny):
    from kvconvert.matryoshka.fold import fold_value_cut

    proj = random_projections(5).with_rates(full_rates(LAYERS, KV, D), MIXED_V)
    ids = ids_for(fresh(tiny), seed=4)
    cut = fresh(tiny)
    MatryoshkaRuntime(proj).attach(cut)
    stock = fresh(tiny)
    ref = stock(ids).logits
    fold_value_cut(stock, proj)
    assert torch.allclose(stock(ids).logits, cut(ids, use_cache=False).logits, atol=1e-5)
    assert (stock(ids).logits - ref).abs().max() > 1e-2
    with pytest.raises(Exception, match="values-only"):
        fold_value_cut(stock, random_projections().with_rates(MIXED_K, MIXED_V))


def test_cli_fold_values_writes_a_stock_checkpoint(tiny, text_a, tmp_path):
    out = tmp_path / "folded"
    args = ["matryoshka", str(tiny), "--output", str(out), "--dataset", str(text_a), "--budget", "0.75"]
    args += ["--samples", "4", "--heldout", "1", "--seq-len", "16", "--steps", "2", "--rate-step", "4"]
    result = CliRunner().invoke(app, [*args, "--values-only", "--fold-values"])
    assert result.exit_code == 0, result.output
    section = json.loads((out / "kvconvert.json").read_text())["matryoshka"]
    assert section["folded_into_v_proj"] and torch.tensor(section["key_rates"]).eq(D).all()
    assert section["kept_fraction"] <= 0.75
    stock = fresh(out)
    assert not (out / "matryoshka.safetensors").exists()
    assert stock(ids_for(stock)).logits.isfinite().all()


@torch.no_grad()
def test_left_padded_batch_generate_at_full_rate_matches_stock(tiny):
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    kwargs |= dict(output_scores=True, return_dict_in_generate=True)
    model = fresh(tiny)
    ref = model.generate(ids, **kwargs)
    rt = MatryoshkaRuntime(random_projections(2))
    rt.attach(model)
    out = model.generate(ids, past_key_values=rt.new_cache(model, 2), **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(ref.scores, out.scores, strict=True)) < 1e-4


@torch.no_grad()
def test_eval_cache_matryoshka_cuts_against_the_models_own_full_attention(tiny, tmp_path):
    """`eval --cache matryoshka:DIR` goes through the runtime registry; its `full` row is the stock model (the
    runtime's attention function cuts on any cache, so the baseline must switch back to the model's own)."""
    import math
    import shutil

    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.runtime import RUNTIMES

    out = tmp_path / "out"
    shutil.copytree(tiny, out)
    proj = random_projections(1)
    cut = Projections(proj.key_basis, proj.value_basis, MIXED_K, MIXED_V)
    save_projections(out / "matryoshka.safetensors", cut, {"budget": 0.5})
    assert "matryoshka" in RUNTIMES
    model, windows, spec = fresh(out), ids_for(fresh(out), 2, 12), f"matryoshka:{out}"
    report = evaluate_cache(model, load_tokenizer(str(out)), spec, windows, [], chunk=4)
    stock = fresh(out)
    logits = stock(windows).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert report["methods"]["full"]["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-4)
    assert abs(report["methods"][spec]["perplexity"] - report["methods"]["full"]["perplexity"]) > 1e-3


@torch.no_grad()
def test_sliding_window_layers_keep_only_their_window_and_match_the_masked_pass(tmp_path):
    """Gemma 3-style models: a sliding-window layer's cache keeps its last `window - 1` tokens (as transformers'
    own DynamicSlidingWindowLayer), decoding still equals the uncached masked pass, and the computed bytes count
    the window."""
    from tests.tiny import make_random

    path = make_random(tmp_path / "g3", "gemma3", heads=4, kv_heads=KV, head_dim=D, layers=LAYERS)
    model = fresh(path)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.sliding_window == 8
    ids = ids_for(model, n=2, t=20, seed=3)
    rt = MatryoshkaRuntime(random_projections(3).with_rates(MIXED_K, MIXED_V))
    rt.attach(model)
    masked = model(ids, use_cache=False).logits
    cache = rt.new_cache(model, 2)
    steps = [model(ids[:, :11], past_key_values=cache, use_cache=True).logits]  # a prompt longer than the window
    for t in range(11, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1), masked, atol=1e-5)
    sliding, full = cache.layers
    assert cache.get_seq_length() == 20 and sliding.is_sliding and not full.is_sliding
    assert {t.shape[-2] for t in sliding.group_keys + sliding.group_values} == {7}
    assert {t.shape[-2] for t in full.group_keys + full.group_values} == {20}
    per_layer = (MIXED_K + MIXED_V).sum(1)
    assert cache.nbytes() == rt.kv_bytes(20, 2) == 2 * 4 * int(7 * per_layer[0] + 20 * per_layer[1])


@pytest.mark.parametrize("mode", ["beam search", "prompt lookup"])
@torch.no_grad()
def test_beam_search_and_prompt_lookup_at_full_rate_match_stock(tiny, mode, monkeypatch):
    """generate() reorders the cache's rows for beams and crops rejected draft tokens for prompt lookup: at full
    rate both give the stock tokens, through the layer's own `reorder_cache` / `crop`."""
    from kvconvert.runtime.matryoshka import MatryoshkaLayer

    method = {"beam search": "reorder_cache", "prompt lookup": "crop"}[mode]
    calls = []
    real = getattr(MatryoshkaLayer, method)
    monkeypatch.setattr(MatryoshkaLayer, method, lambda self, *a: calls.append(a) or real(self, *a))
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([ids, ids], dim=1)  # repeats, so prompt lookup has drafts to propose
    extra = {"num_beams": 3} if mode == "beam search" else {"prompt_lookup_num_tokens": 3}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)) | extra
    model = fresh(tiny)
    ref = model.generate(ids, **kwargs)
    rt = MatryoshkaRuntime(random_projections(2))
    rt.attach(model)
    assert torch.equal(model.generate(ids, past_key_values=rt.new_cache(model, 1), **kwargs), ref)
    assert calls
