"""Family adapters: reading then writing a layer's tensors gives them back unchanged, for every registered family,
and fused layouts split into the heads transformers computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

from kvconvert.families import FAMILIES, family_for
from kvconvert.merge.qknorm import key_maps
from tests.tiny import tiny_config


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_read_then_write_is_identity(fam):
    torch.manual_seed(0)
    config = tiny_config(fam.name, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    geom = fam.geometry(config)
    attn = fam.attention_module(model.get_submodule(fam.layers_path)[0])
    state = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    weights = fam.read(state, geom)
    assert weights.k_weight.shape == (geom.num_kv_heads * geom.head_dim, geom.hidden_size)
    assert weights.q_weight.shape == (geom.num_heads * geom.head_dim, geom.hidden_size)
    back = fam.write(weights, geom)
    assert set(back) == set(state)
    for name, t in state.items():
        assert torch.equal(back[name], t), name


def test_falcon_groups_follow_transformers_attention():
    """The fused `query_key_value`, read into separate q/k/v/o, gives exactly the attention transformers' Falcon
    computes (RoPE, causal SDPA, query head i reading KV head i // 2, `dense`): checked on the output, not on a
    private split helper, which transformers 5.25 removed."""
    torch.manual_seed(0)
    config = tiny_config("falcon", heads=4, kv_heads=2)
    config._attn_implementation = "sdpa"
    fam = family_for(config)
    geom = fam.geometry(config)
    model = AutoModelForCausalLM.from_config(config).eval()
    attn = model.transformer.h[0].self_attention
    w = fam.read(attn.state_dict(), geom)
    t, d, h, kv = 5, geom.head_dim, geom.num_heads, geom.num_kv_heads
    x = torch.randn(1, t, geom.hidden_size)
    pos = torch.arange(t)[None]
    cos, sin = model.transformer.rotary_emb(x, pos)
    with torch.no_grad():
        got = attn(x, alibi=None, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))[0]
        q = (x @ w.q_weight.T + w.q_bias).view(1, t, h, d).transpose(1, 2)
        k = (x @ w.k_weight.T + w.k_bias).view(1, t, kv, d).transpose(1, 2)
        v = (x @ w.v_weight.T + w.v_bias).view(1, t, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = heads.transpose(1, 2).reshape(1, t, h * d) @ w.o_weight.T
        want = want + w.o_bias if w.o_bias is not None else want
    torch.testing.assert_close(got, want)


def test_qk_norm_key_maps_of_duplicates_are_identity():
    """Two identical sources (a norm weight with zeros, as Gemma 3 has): the pre-norm encoder averages them and the
    decoder is the identity (ρ = 1: the unit keys keep their RMS)."""
    d = 8
    base = torch.randn(d, d, dtype=torch.float64)
    block = base @ base.T
    block = block / (block.trace() / d)  # unit keys: E||u||² = d
    moment = torch.cat([torch.cat([block, block], 1), torch.cat([block, block], 1)], 0)
    energy = torch.rand(2, d // 2, dtype=torch.float64) + 0.5
    weight = torch.rand(d, dtype=torch.float64).expand(2, d).clone()
    weight[:, 3] = 0.0
    enc, dec = key_maps(moment, energy, torch.tensor([0.7, 0.7], dtype=torch.float64), weight, d, d)
    torch.testing.assert_close(enc[:, :d] + enc[:, d:], torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(dec, torch.cat([torch.eye(d, dtype=torch.float64)] * 2))
