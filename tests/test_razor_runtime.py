"""The razor KV cache on tiny stock models: exactness, memory accounting, compensation, batches and chunks."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, DynamicCache

from kvconvert.errors import KVConvertError
from kvconvert.runtime import runtime_for
from kvconvert.runtime.razor import policy_for, runtime_from_policy
from kvconvert.runtime.razor_cache import RazorLayer
from kvconvert.runtime.razor_policy import RazorPolicy
from tests.tiny import DEVICES


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2, attn_implementation="sdpa").eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids, cache, chunk):
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids[:, i : i + chunk], past_key_values=cache).logits
                for i in range(0, ids.shape[1], chunk)
            ],
            dim=1,
        )


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_keep_everything_matches_dynamic_cache(name, request):
    model = request.getfixturevalue(name)
    rt = runtime_from_policy(model, policy_for(model, [[0], [1, 3]], window_floor=10_000))
    rt.attach(model)
    ids = _ids(2, 37)
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
    for chunk in (37, 8, 1):
        assert torch.allclose(_chunked(model, ids, rt.new_cache(model, 2), chunk), ref, atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    mask = torch.ones_like(ids)
    ours = model.generate(ids, attention_mask=mask, past_key_values=rt.new_cache(model, 2), **kw)
    stock = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(ours.sequences, stock.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(ours.logits, stock.logits, strict=True)) < 1e-5


def _sink_window_mask(length: int, sinks: int, window: int) -> torch.Tensor:
    i = torch.arange(length)
    return (i[None, :] <= i[:, None]) & ((i[None, :] < sinks) | (i[None, :] > i[:, None] - window))


@pytest.mark.parametrize("device", DEVICES)
def test_windowed_heads_match_a_direct_masked_computation(llama, device):
    """All heads windowed, no compensation, prompt_attention="window": the same logits as full attention under a
    sink + window mask, on every device there is (the cache and the attention function follow the model's
    device)."""
    model = llama if device == "cpu" else copy.deepcopy(llama).to(device)
    rt = runtime_from_policy(
        model,
        policy_for(
            model, [[], []], sinks=2, window_floor=6, window_fraction=0.0, compensation=False, prompt_attention="window"
        ),
    )
    rt.attach(model)
    ids = _ids(2, 40).to(device)
    mask = _sink_window_mask(40, 2, 6)[None, None].expand(2, 1, 40, 40).to(device)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    for chunk in (1, 7, 40):
        assert torch.allclose(_chunked(model, ids, rt.new_cache(), chunk), ref, atol=1e-5, rtol=0)


@settings(max_examples=8, deadline=None)
@given(
    chunk=st.integers(1, 9),
    sinks=st.integers(0, 3),
    floor=st.integers(1, 8),
    fraction=st.sampled_from([0.0, 0.25]),
    batch=st.integers(1, 2),
)
def test_held_bytes_equal_policy_at_every_step(llama, chunk, sinks, floor, fraction, batch):
    policy = policy_for(llama, [[2], [0, 1]], sinks=sinks, window_floor=floor, window_fraction=fraction)
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    cache = rt.new_cache()
    ids = _ids(batch, 30, seed=chunk)
    with torch.no_grad():
        for i in range(0, 30, chunk):
            llama(input_ids=ids[:, i : i + chunk], past_key_values=cache)
            seen = min(i + chunk, 30)
            assert cache.get_seq_length() == seen
            assert cache.storage_bytes() == cache.tensor_bytes() == rt.kv_bytes(seen, batch)
    assert rt.kv_bytes(30, batch) < policy.full_kv_bytes(30, batch, 4) or floor + sinks + 1 >= 30


@pytest.mark.parametrize("chunk", [1, 4, 23])
def test_compensation_token_is_the_mean_of_dropped_tokens(chunk):
    """Fed in chunks, a layer holds sinks, the mean of every dropped key/value, and the last window exactly."""
    policy = RazorPolicy(((0,),), num_kv_heads=3, head_dim=8, sinks=2, window_floor=5, window_fraction=0.0)
    layer = RazorLayer(policy, 0, num_query_heads=6)
    gen = torch.Generator().manual_seed(chunk)
    keys, values = torch.randn(2, 3, 23, 8, generator=gen), torch.randn(2, 3, 23, 8, generator=gen)
    for i in range(0, 23, chunk):
        layer.update(keys[..., i : i + chunk, :], values[..., i : i + chunk, :])
    (group,) = layer.groups
    for held, full in ((group.k, keys[:, 1:]), (group.v, values[:, 1:])):
        assert held.shape[-2] == 2 + 1 + 5
        assert torch.equal(held[..., :2, :], full[..., :2, :])  # sinks
        assert torch.allclose(held[..., 2, :], full[..., 2:18, :].mean(-2), atol=1e-6)  # the 16 dropped
        assert torch.equal(held[..., 3:, :], full[..., 18:, :])  # the last 5
    assert torch.equal(layer.full_k, keys[:, :1]) and torch.equal(layer.full_v, values[:, :1])
    assert group.dropped == 16


def test_batch_rows_are_independent(llama):
    rt = runtime_from_policy(llama, policy_for(llama, [[1], []], sinks=1, window_floor=4, window_fraction=0.1))
    rt.attach(llama)
    ids = _ids(3, 26)
    both = _chunked(llama, ids, rt.new_cache(), 5)
    for b in range(3):
        assert torch.allclose(both[b], _chunked(llama, ids[b : b + 1], rt.new_cache(), 5)[0], atol=1e-5, rtol=0)


def test_without_cache_it_is_sdpa(llama):
    rt = runtime_from_policy(llama, policy_for(llama, [[0], [0]]))
    ids = _ids(2, 12)
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        ref = llama(input_ids=ids, use_cache=False).logits
        rt.attach(llama)
        assert torch.allclose(llama(input_ids=ids, use_cache=False).logits, ref, atol=1e-6, rtol=0)


def test_padded_batches_are_refused(llama):
    rt = runtime_from_policy(llama, policy_for(llama, [[0], [0]]))
    rt.attach(llama)
    ids, mask = _ids(2, 10), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), torch.no_grad():
        llama(input_ids=ids, attention_mask=mask, past_key_values=rt.new_cache())


def test_policy_arithmetic():
    p = RazorPolicy(((0,), ()), num_kv_heads=2, head_dim=4, sinks=2, window_floor=3, window_fraction=0.5)
    assert p.windowed_tokens(0, 1) == (1, 0, 0)
    assert p.windowed_tokens(0, 5) == (2, 0, 3)
    assert p.windowed_tokens(0, 20) == (2, 1, 10)
    assert p.kept_tokens(0, 20) == 20 + 13 and p.kept_tokens(1, 20) == 2 * 13
    assert p.kv_bytes(20, 1, 2) == 2 * (33 + 26) * 4 * 2
    with pytest.raises(ValueError):
        RazorPolicy(((2,),), num_kv_heads=2, head_dim=4)


def test_runtime_for_unknown_kind(llama):
    with pytest.raises(KVConvertError, match="unknown cache runtime"):
        runtime_for("nope", llama)


@pytest.mark.parametrize("chunk", [1, 5, 30])
def test_each_head_keeps_its_own_window(chunk):
    """With `head_fraction`, every windowed head holds what a one-head layer with that window fraction holds."""
    fractions = (0.5, 0.0, 0.5, 0.25)  # head 3 is a retrieval head: its fraction is unused
    policy = RazorPolicy(((3,),), num_kv_heads=4, head_dim=8, sinks=2, window_floor=4, head_fraction=(fractions,))
    layer = RazorLayer(policy, 0, num_query_heads=8)
    assert [g.heads for g in layer.groups] == [[0, 2], [1]]  # one group per distinct window
    gen = torch.Generator().manual_seed(chunk)
    keys, values = torch.randn(1, 4, 30, 8, generator=gen), torch.randn(1, 4, 30, 8, generator=gen)
    singles = {}
    for h in range(3):
        one = RazorPolicy(((),), num_kv_heads=1, head_dim=8, sinks=2, window_floor=4, window_fraction=fractions[h])
        singles[h] = RazorLayer(one, 0, num_query_heads=2)
    for i in range(0, 30, chunk):
        k, v = keys[..., i : i + chunk, :], values[..., i : i + chunk, :]
        layer.update(k, v)
        for h, single in singles.items():
            single.update(k[:, h : h + 1], v[:, h : h + 1])
    for g in layer.groups:
        for j, h in enumerate(g.heads):
            (ref,) = singles[h].groups
            assert torch.equal(g.k[:, j], ref.k[:, 0]) and torch.equal(g.v[:, j], ref.v[:, 0])
            assert g.k.shape[-2] == sum(policy.windowed_tokens(0, 30, h))
    assert torch.equal(layer.full_k, keys[:, 3:])


def test_head_fraction_policy_arithmetic_and_uniform_equivalence(llama):
    """Per-head windows: held bytes = the policy's at every step; uniform head fractions = the plain rule."""
    fractions = [[0.5, 0.0, 0.2, 0.0], [0.0, 0.3, 0.3, 0.1]]
    policy = policy_for(llama, [[1], []], sinks=1, window_floor=3, window_fraction=0.9, head_fraction=fractions)
    assert policy.kept_tokens(0, 40) == 40 + (1 + 1 + 20) + (1 + 1 + 3) + (1 + 1 + 8)
    assert policy.kept_tokens(1, 40) == (1 + 1 + 3) + 2 * (1 + 1 + 12) + (1 + 1 + 4)
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    cache, ids = rt.new_cache(), _ids(2, 40)
    with torch.no_grad():
        for i in range(0, 40, 7):
            llama(input_ids=ids[:, i : i + 7], past_key_values=cache)
            assert cache.storage_bytes() == rt.kv_bytes(min(i + 7, 40), 2)
    plain = runtime_from_policy(llama, policy_for(llama, [[1], []], sinks=1, window_floor=3, window_fraction=0.2))
    uniform = policy_for(llama, [[1], []], sinks=1, window_floor=3, head_fraction=[[0.2] * 4] * 2)
    same = runtime_from_policy(llama, uniform)
    assert torch.equal(_chunked(llama, ids, plain.new_cache(), 6), _chunked(llama, ids, same.new_cache(), 6))
    with pytest.raises(ValueError, match="head_fraction"):
        policy_for(llama, [[1], []], head_fraction=[[0.2] * 3] * 2)


def test_compensation_bias_is_exact_when_the_dropped_tokens_are_equal():
    """With `compensation_bias`, a compensation token standing for n equal dropped tokens weighs as those n
    tokens: the windowed head's output equals attention over every token it stands for (decode and prefill)."""
    from kvconvert.runtime.razor_attention import razor_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    rule = dict(sinks=1, window_floor=3, window_fraction=0.0, prompt_attention="window")
    policy = RazorPolicy(((),), 1, 8, compensation_bias=True, **rule)
    layer = RazorLayer(policy, 0, num_query_heads=2)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 18, 8, generator=gen), torch.randn(1, 1, 18, 8, generator=gen)
    keys[..., 1:11, :], values[..., 1:11, :] = keys[..., 1:2, :], values[..., 1:2, :]  # tokens 1..10 equal
    queries = torch.randn(1, 2, 18, 8, generator=gen)
    kv = lambda t, n: t[..., :n, :].expand(1, 2, n, 8)  # noqa: E731
    for i in range(14):  # decode: held = sink 0, the mean of 1..10 (n = 10), 11..13
        k, v = layer.update(keys[..., i : i + 1, :], values[..., i : i + 1, :])
    assert layer.groups[0].dropped == 10
    out, _ = razor_attention(None, queries[..., 13:14, :], k, v, None, scaling=8**-0.5)
    ref = sdpa(queries[..., 13:14, :], kv(keys, 14), kv(values, 14), scale=8**-0.5)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)
    k, v = layer.update(keys[..., 14:18, :], values[..., 14:18, :])  # a prefill chunk: 1..10 as one token
    out, _ = razor_attention(None, queries[..., 14:18, :], k, v, None, scaling=8**-0.5)
    pos, qpos = torch.arange(18), torch.arange(14, 18)[:, None]
    visible = (pos <= qpos) & ((pos < 11) | (pos > qpos - 3))  # sink + dropped-before-the-chunk + window
    ref = sdpa(queries[..., 14:18, :], kv(keys, 18), kv(values, 18), attn_mask=visible, scale=8**-0.5)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)
    plain = RazorLayer(RazorPolicy(((),), 1, 8, sinks=1, window_floor=3, window_fraction=0.0), 0, 2)
    for i in range(14):
        k, v = plain.update(keys[..., i : i + 1, :], values[..., i : i + 1, :])
    out, _ = razor_attention(None, queries[..., 13:14, :], k, v, None, scaling=8**-0.5)
    assert not torch.allclose(out.transpose(1, 2), sdpa(queries[..., 13:14, :], kv(keys, 14), kv(values, 14)))


def _chunk_full_mask(length: int, sinks: int, window: int, chunk: int) -> torch.Tensor:
    """A prompt chunk under prompt_attention="full": sinks, what the head held when the chunk began (its last
    `window` tokens), and the chunk itself, causally."""
    pos = torch.arange(length)
    start = (pos // chunk) * chunk  # where each query's chunk began
    held = (pos[None, :] < start[:, None]) & ((pos[None, :] < sinks) | (pos[None, :] >= start[:, None] - window))
    in_chunk = (pos[None, :] >= start[:, None]) & (pos[None, :] <= pos[:, None])
    return held | in_chunk


@pytest.mark.parametrize("chunk", [7, 40])
def test_full_prompt_attention_sees_everything_held_and_the_chunk(llama, chunk):
    """prompt_attention="full": a chunk attends to all the head holds plus itself (one chunk: the full model's
    logits, as RazorAttention compresses after the prompt); the held bytes stay the policy's."""
    policy = policy_for(
        llama, [[], []], sinks=2, window_floor=6, window_fraction=0.0, compensation=False, prompt_attention="full"
    )
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    ids = _ids(2, 40)
    mask = _chunk_full_mask(40, 2, 6, chunk)[None, None].expand(2, 1, 40, 40)
    cache = rt.new_cache()
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
        windowed = llama(input_ids=ids, attention_mask=_sink_window_mask(40, 2, 6)[None, None].expand(2, 1, 40, 40))
    got = _chunked(llama, ids, cache, chunk)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got, windowed.logits, atol=1e-3, rtol=0)  # the mode changes what a chunk sees
    assert cache.storage_bytes() == rt.kv_bytes(40, 2)
    if chunk == 40:
        with torch.no_grad():
            dyn = llama(input_ids=ids, past_key_values=DynamicCache(config=llama.config)).logits
        assert torch.allclose(got, dyn, atol=1e-5, rtol=0)


def test_prompt_attention_can_switch_to_window_for_scoring(llama):
    """A prompt read with "full", then text read with "window": the text's logits are those of decoding it
    token by token through the same cache (without a compensation token, which a chunk reads as it began)."""
    rule = dict(sinks=1, window_floor=5, window_fraction=0.0, compensation=False, prompt_attention="full")
    policy = policy_for(llama, [[1], []], **rule)
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    ids = _ids(1, 30, seed=3)
    chunked, stepped = rt.new_cache(), rt.new_cache()
    with torch.no_grad():
        llama(input_ids=ids[:, :18], past_key_values=chunked)
        llama(input_ids=ids[:, :18], past_key_values=stepped)
        chunked.set_prompt_attention("window")
        got = llama(input_ids=ids[:, 18:], past_key_values=chunked).logits
        want = torch.cat([llama(input_ids=ids[:, i : i + 1], past_key_values=stepped).logits for i in range(18, 30)], 1)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt attention"):
        chunked.set_prompt_attention("everything")
    with pytest.raises(ValueError, match="prompt_attention"):
        RazorPolicy(((0,),), num_kv_heads=2, head_dim=4, prompt_attention="all")


def test_generate_reads_the_prompt_in_full_then_holds_the_policy(llama):
    """Stock `generate` with prompt_attention="full": the first new token comes from full attention over the
    prompt (the stock model's), later ones through the cut cache, which holds exactly the policy's bytes."""
    policy = policy_for(llama, [[1], []], sinks=2, window_floor=4, window_fraction=0.0)
    assert policy.prompt_attention == "full"
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    ids = _ids(2, 33, seed=5)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = rt.new_cache(llama, 2)
    ours = llama.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kw)
    stock = llama.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.allclose(ours.logits[0], stock.logits[0], atol=1e-5, rtol=0)
    assert not torch.allclose(ours.logits[-1], stock.logits[-1], atol=1e-4, rtol=0)
    assert cache.storage_bytes() == rt.kv_bytes(cache.get_seq_length(), 2) < policy.full_kv_bytes(37, 2, 4)


def test_a_question_after_the_cut_sees_only_what_the_cache_kept(llama):
    """`greedy(..., then=question)`: the document is read at once and cut, then the question is read as a second
    prompt: its logits are the model's under a mask where the question sees the sinks, the document's last
    `window` tokens and itself (not the whole document, as a question inside the prompt does); with a cache that
    keeps everything, the answer is the one for the concatenated prompt."""
    from kvconvert.evaluation.longcontext import greedy, prefill

    policy = policy_for(llama, [[], []], sinks=2, window_floor=6, window_fraction=0.0, compensation=False)
    rt = runtime_from_policy(llama, policy)
    rt.attach(llama)
    ids = _ids(1, 40, seed=11)
    text, question = ids[:, :20], ids[:, 20:]
    cache = rt.new_cache()
    prefill(llama, text, cache, 0)
    got = prefill(llama, question, cache, 0)
    mask = _chunk_full_mask(40, 2, 6, 20)[None, None]
    with torch.no_grad():
        want = llama(input_ids=ids, attention_mask=mask).logits[:, 20:]
        whole = llama(input_ids=ids).logits[:, 20:]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, whole, atol=1e-3, rtol=0)
    assert cache.storage_bytes() == rt.kv_bytes(40)
    after = greedy(llama, text, rt.new_cache(), 0, 3, then=question)
    assert after[0, 0] == want[0, -1].argmax()
    dynamic = lambda: DynamicCache(config=llama.config)  # noqa: E731
    assert torch.equal(greedy(llama, text, dynamic(), 0, 4, then=question), greedy(llama, ids, dynamic(), 0, 4))


@pytest.mark.parametrize("prompt_attention", ["full", "window"])
def test_sliding_window_layers_attend_through_their_window_in_every_prompt_mode(tmp_path, prompt_attention):
    """Gemma 3-style models: with every full-attention head a retrieval head, the razor cache is the stock cache,
    for a prompt longer than the sliding window read at once, in chunks, or a token at a time, then decoding."""
    from tests.tiny import make_random

    path = make_random(tmp_path / "g3", "gemma3", heads=4, kv_heads=2, head_dim=16, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.sliding_window == 8
    rt = runtime_from_policy(model, policy_for(model, [[], [0, 1]], prompt_attention=prompt_attention))
    ids = torch.randint(0, model.config.vocab_size, (2, 27), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
    rt.attach(model)
    for chunk in (20, 6, 1):
        cache = rt.new_cache(model, 2)
        got = torch.cat([_chunked(model, ids[:, :20], cache, chunk), _chunked(model, ids[:, 20:], cache, 1)], dim=1)
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (chunk, float((got - ref).abs().max()))


def test_beam_search_reorders_every_held_tensor(llama):
    """Beam search through the cache equals stock beam search when the policy keeps everything (the mixin's
    `reorder_cache` moved only `keys/values`, which the next step replaced: the beams kept their old caches)."""
    rt = runtime_from_policy(llama, policy_for(llama, [[0], [1, 3]], window_floor=10_000))
    rt.attach(llama)
    ids = _ids(2, 20)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, attention_mask=torch.ones_like(ids), pad_token_id=0)
    stock = llama.generate(ids, past_key_values=DynamicCache(config=llama.config), **kw)
    assert torch.equal(llama.generate(ids, past_key_values=rt.new_cache(llama, 2), **kw), stock)


@torch.no_grad()
def test_reordered_repeated_and_selected_rows_decode_as_that_batch_would(llama):
    """With windows that have dropped tokens: a cache whose rows were reordered (or repeated, or selected) decodes
    exactly as a cache filled with that batch."""
    rt = runtime_from_policy(llama, policy_for(llama, [[1], []], sinks=2, window_floor=4, window_fraction=0.0))
    rt.attach(llama)
    ids, nxt = _ids(2, 30, seed=3), _ids(4, 1, seed=4)

    def filled(batch):
        cache = rt.new_cache(llama, batch.shape[0])
        llama(input_ids=batch, past_key_values=cache)
        return cache

    def step(cache, rows):
        return llama(input_ids=nxt[:rows], past_key_values=cache).logits

    for change, batch in [
        (lambda c: c.reorder_cache(torch.tensor([1, 0])), ids.flip(0)),
        (lambda c: c.batch_repeat_interleave(2), ids.repeat_interleave(2, dim=0)),
        (lambda c: c.batch_select_indices(torch.tensor([1])), ids[1:]),
    ]:
        cache = filled(ids)
        change(cache)
        assert torch.allclose(step(cache, len(batch)), step(filled(batch), len(batch)), atol=1e-5, rtol=0)


def test_taking_tokens_back_is_refused_with_the_reason(llama):
    rt = runtime_from_policy(llama, policy_for(llama, [[1], []], sinks=2, window_floor=4, window_fraction=0.0))
    rt.attach(llama)
    ids = torch.cat([_ids(1, 12)] * 2, dim=1)  # repeats, so prompt lookup proposes tokens and crops the rejected
    # the layer's own reason; newer transformers (5.25) read `is_croppable` first and refuse with theirs
    with pytest.raises(ValueError, match=r"cannot take tokens back|requires a cache that can be cropped"):
        llama.generate(ids, past_key_values=rt.new_cache(llama, 1), max_new_tokens=6, prompt_lookup_num_tokens=3)
