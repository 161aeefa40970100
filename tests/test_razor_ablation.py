"""Ablation profiling: the profile's windowing is the runtime's, greedy selection, and the CLI option."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.razor.ablation import copy_losses, drop_ranking, greedy_select, single_head_plans, window_mask
from kvconvert.runtime.razor import policy_for, runtime_from_policy
from kvconvert.runtime.razor_cache import RazorLayer
from kvconvert.runtime.razor_policy import RazorPolicy

_register()
runner = CliRunner()
RULE = {"sinks": 2, "window_floor": 8, "window_fraction": 0.1}


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 300, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_window_mask_is_the_runtime_window(fraction):
    policy = RazorPolicy(
        ((),), num_kv_heads=1, head_dim=4, sinks=3, window_floor=5, window_fraction=fraction, prompt_attention="window"
    )
    (group,) = RazorLayer(policy, 0, num_query_heads=1).groups
    group.device = torch.device("cpu")
    assert torch.equal(window_mask(60, 3, 5, fraction), group._window_mask(0, 60))


def test_copy_loss_is_the_runtime_loss_with_those_heads_windowed(llama):
    """One-chunk prefill through a RazorCache (no compensation) gives the profile's loss for the same heads."""
    ids, first = _ids(48), 20
    windowed = torch.tensor([[False, True, False, False], [True, False, True, True]])
    full, ablated = copy_losses(llama, ids, first, [torch.zeros_like(windowed), windowed], RULE)
    retrieval = [torch.nonzero(~row).flatten().tolist() for row in windowed]
    rt = runtime_from_policy(llama, policy_for(llama, retrieval, **RULE, compensation=False, prompt_attention="window"))
    rt.attach(llama)
    try:
        with torch.no_grad():
            logits = llama(input_ids=ids, past_key_values=rt.new_cache(llama)).logits
    finally:
        llama.set_attn_implementation("sdpa")
    runtime = float(F.cross_entropy(logits[0, first:-1], ids[0, first + 1 :]))
    assert abs(ablated - runtime) < 1e-5
    assert abs(full - ablated) > 1e-3  # the window (8 tokens) really cuts the context


def test_greedy_select_takes_eligible_heads_best_first(llama):
    ids, first = _ids(48, seed=1), 20
    eligible = torch.tensor([[True, True, True, True], [False, True, False, True]])
    order, history = greedy_select(llama, ids, first, eligible, RULE, count=3, rounds=2)
    assert len(order) == len(set(order)) == 3 and all(eligible[c] for c in order)
    gains = history[0]["gains"]
    assert len(gains) == int(eligible.sum()) and str(order[0]) == max(gains, key=gains.get)
    assert history[1]["scored"] == int(eligible.sum()) - 2  # round 0 took ceil(3 / 2) heads
    assert history[1]["loss"] < history[0]["loss"]  # keeping the chosen heads in full lowers the copy loss


def test_drop_ranking_orders_heads_by_the_loss_of_windowing_each_alone(llama):
    ids, first = _ids(48, seed=2), 20
    eligible = torch.tensor([[True, False, True, True], [True, True, True, False]])
    order, scores = drop_ranking(llama, ids, first, eligible, RULE)
    assert sorted(order) == sorted(map(tuple, torch.nonzero(eligible).tolist()))
    cells, plans = single_head_plans(eligible, torch.zeros_like(eligible))
    losses = dict(zip(cells, copy_losses(llama, ids, first, plans, RULE), strict=True))
    assert [losses[c] for c in order] == sorted(losses.values(), reverse=True)
    assert abs(scores["drop"][str(order[0])] - (losses[order[0]] - scores["full_loss"])) < 1e-6


def test_profile_cli_ablation(tmp_path, tiny_llama):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    out = tmp_path / "profile.json"
    args = ["profile", str(ckpt), "-o", str(out), "--block", "24", "--window-floor", "8", "--retrieval", "0.25"]
    r = runner.invoke(app, [*args, "--scoring", "ablation"])
    assert r.exit_code == 0, r.output
    profile = json.loads(out.read_text())
    assert profile["settings"]["scoring"] == "ablation" and len(profile["ranking"]) == 2
    assert sorted(map(tuple, profile["ranking"])) == [(i, h) for i, row in enumerate(profile["retrieval"]) for h in row]
    assert set(profile["held_out_copy_loss"]) == {"full", "selected", "windowed", "random"}
    assert profile["runtime"]["sinks"] == 32 and profile["settings"]["probe_sinks"] == 4  # the defaults
    assert profile["settings"]["prefix"] == 8
    r = runner.invoke(app, [*args[:3], str(tmp_path / "p4.json"), *args[4:], "--probe-sinks", "12", "--sinks", "6"])
    assert r.exit_code == 0, r.output
    p4 = json.loads((tmp_path / "p4.json").read_text())
    assert p4["settings"]["prefix"] == 12 and p4["runtime"]["sinks"] == 6  # the probe's sinks never see the block
    r = runner.invoke(app, [*args[:3], str(tmp_path / "p3.json"), *args[4:]])  # the default scoring
    assert r.exit_code == 0, r.output
    drop = json.loads((tmp_path / "p3.json").read_text())
    assert len(drop["ranking"]) == 2 and len(drop["drop"]) == 8 and "rounds" not in drop
    r = runner.invoke(app, ["profile", str(ckpt), "-o", str(tmp_path / "p2.json"), "--block", "24"])
    assert r.exit_code != 0 and "longer than the runtime's window" in str(r.exception)


def test_copy_loss_of_several_sequences_is_their_mean_and_drop_reports_stability(llama):
    """With more than one probe sequence (seeds) every row counts, not only the first, and the drop ranking
    gives one ranking per row, from which the profile reports how stable the selection is."""
    from kvconvert.razor.ablation import selection_stability

    ids, first = torch.cat([_ids(48, seed=1), _ids(48, seed=2)]), 20
    windowed = torch.tensor([[False, True, False, False], [True, False, True, True]])
    both = copy_losses(llama, ids, first, [windowed], RULE)[0]
    rows = [copy_losses(llama, ids[i : i + 1], first, [windowed], RULE)[0] for i in range(2)]
    assert abs(rows[0] - rows[1]) > 1e-3
    assert both == pytest.approx(sum(rows) / 2, abs=1e-5)
    eligible = torch.ones(2, 4, dtype=torch.bool)
    order, scores = drop_ranking(llama, ids, first, eligible, RULE)
    assert len(scores["seed_rankings"]) == 2 and all(len(r) == 8 for r in scores["seed_rankings"])
    stability = selection_stability(scores["seed_rankings"], order[:3])
    assert 0 <= stability["jaccard_min"] <= stability["jaccard_mean"] <= 1
    same = selection_stability([[list(c) for c in order]] * 2, order[:3])
    assert same["jaccard_per_seed"] == [1.0, 1.0]


def test_profile_reports_progress_per_forward_pass(llama):
    """The ablation profile advances its progress bar once per forward pass: one full pass, one per eligible
    head, and the four held-out checks for the drop scoring; the greedy scoring counts without a total."""
    from kvconvert.razor.ablation import profile_ablation

    class Recorder:
        def __init__(self):
            self.tasks = []

        def task(self, description, total):
            self.tasks.append([description, total, 0])
            return lambda n=1, info=None: self.tasks[-1].__setitem__(2, self.tasks[-1][2] + n)

        def log(self, message):
            pass

    eligible = torch.tensor([[True, True, False, True], [True, False, True, True]])
    kw = dict(block=24, repeats=2, seeds=1, fraction=0.25, rounds=2, pool=0, prefix=8)
    drop, greedy = Recorder(), Recorder()
    profile_ablation(llama, eligible, RULE, greedy=False, progress=drop, **kw)
    assert [(t[1], t[2]) for t in drop.tasks] == [(1 + 6 + 4, 1 + 6 + 4)]
    profile_ablation(llama, eligible, RULE, greedy=True, progress=greedy, **kw)
    ((_, total, done),) = greedy.tasks
    assert total is None and done == (1 + 6) + (1 + 5) + 4  # 2 heads: one per round
