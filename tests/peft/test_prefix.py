"""Prefix tuning through the KV cache: generation with the cache equals recomputation, masks and positions
line up with padding, the base is untouched, and gradients reach the prefix only."""

from __future__ import annotations

import copy

import pytest
import torch

from nanomm import peft
from nanomm.models.generation import generate
from nanomm.nn.attention import KVCache


def _prefixed(tiny, family="llama", **kw):
    model = tiny(family)
    peft.apply(model, peft.PrefixConfig(num_virtual_tokens=3, **kw))
    with torch.no_grad():  # a prefix far from the keys' scale, so it visibly changes the output
        model.peft_prefix.encoder.embedding.weight.normal_(0, 2.0)
    return model


@pytest.mark.parametrize("family, projection", [("llama", False), ("llama", True), ("gpt", False)])
def test_cached_generation_equals_recomputation(tiny, family, projection):
    model = _prefixed(tiny, family, projection=projection)
    ids = torch.randint(1, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding: explicit positions and a mask
    for m in (None, mask):
        cached = generate(model, ids, m, max_new_tokens=6, use_cache=True, output_logits=True)
        full = generate(model, ids, m, max_new_tokens=6, use_cache=False, output_logits=True)
        assert torch.equal(cached.sequences, full.sequences)
        # the cache changes only the order of float32 sums: logits of size ~1 agree to a few ulps
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), atol=1e-5, rtol=0)
    with torch.no_grad(), peft.disable_adapters(model):
        base = generate(model, ids, max_new_tokens=6, output_logits=True)
    assert (torch.stack(base.logits) - torch.stack(generate(model, ids, max_new_tokens=6, output_logits=True).logits)
            ).abs().max() > 1e-2


def test_padded_row_computes_what_it_would_alone(tiny):
    model = _prefixed(tiny)
    ids = torch.randint(1, 99, (1, 4), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids).logits
        together = generate(model, padded, mask, max_new_tokens=1, output_logits=True).logits[0]
    # real tokens sit at positions P, P+1, ... either way; the pads are masked out
    torch.testing.assert_close(together, alone[:, -1], atol=1e-5, rtol=0)


def test_cache_starts_with_the_prefix(tiny):
    model = _prefixed(tiny)
    ids = torch.randint(1, 99, (2, 4))
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert cache.length == 3 + 4 and cache.prefix_length == 3
    expected = model.peft_prefix.encoder()[0]  # layer 0 keys, (n_kv, P, D)
    torch.testing.assert_close(cache.keys[0][:, :, :3], expected.expand(2, -1, -1, -1))


def test_errors_name_the_argument(tiny):
    model = _prefixed(tiny)
    ids = torch.randint(1, 99, (2, 4))
    with peft.disable_adapters(model):
        plain = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values: this cache was filled without the prefix"):
        model(ids[:, :1], past_key_values=plain)
    with pytest.raises(ValueError, match="attention_mask: expected"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="model: prefix tuning needs a decoder"):
        peft.apply(tiny("bert"), peft.PrefixConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge(model)


def test_gradients_reach_the_prefix_only(tiny):
    model = _prefixed(tiny, projection=True).train()
    model(torch.randint(1, 99, (2, 4))).logits.logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("peft_prefix.")}
    assert len(trained) == 5  # the table and the MLP's two layers (weight, bias)


def test_deepcopy_and_unload(tiny):
    model = _prefixed(tiny)
    ids = torch.randint(1, 99, (2, 4))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.peft_prefix.encoder.embedding.weight.zero_()
        ours, theirs = model(ids).logits, twin(ids).logits
    assert (ours - theirs).abs().max() > 1e-3  # the copy's hook reads the copy's prefix
    with torch.no_grad(), peft.disable_adapters(model):
        base = model(ids).logits
    peft.unload(twin)
    assert not peft.has_adapters(twin) and not hasattr(twin, "peft_prefix")
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, base, atol=0, rtol=0)
        torch.testing.assert_close(model(ids).logits, ours, atol=0, rtol=0)  # the original keeps its hook
    assert isinstance(model(ids, past_key_values=KVCache()).past_key_values, KVCache)
