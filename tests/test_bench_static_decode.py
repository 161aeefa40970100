"""The GPU benchmark's static-cache decode step computes what stock decoding with a `DynamicCache` computes."""

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.razor_speed import cache_bytes
from bench.static_decode import StaticDecoder


def test_static_decode_steps_match_dynamic_cache_decoding():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    dec = StaticDecoder(model, batch=3, context=20, steps=4)
    ref = DynamicCache(config=config)
    for i, layer in enumerate(dec.cache.layers):
        ref.update(layer.keys[:, :, :20].clone(), layer.values[:, :, :20].clone(), i)
    tok, pos = dec.tok.clone(), dec.pos.clone()
    for _ in range(4):
        dec.step()
        with torch.no_grad():
            want = model(input_ids=tok, position_ids=pos, past_key_values=ref, use_cache=True).logits[:, -1]
        torch.testing.assert_close(dec.logits, want, rtol=1e-4, atol=1e-4)
        tok, pos = want.argmax(-1, keepdim=True), pos + 1
        assert torch.equal(dec.tok, tok)
    assert int(dec.slot) == 24 and cache_bytes(dec.cache) == 2 * 2 * 3 * 2 * 24 * 8 * 4
