"""GPT-1/2 against transformers, and the decoder interface generation relies on: cache, left padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanomm.models import GPT, GPTConfig, build, from_hf
from nanomm.nn.attention import KVCache

# float32 with two tiny layers: differences are summation order only (~1e-7); see test_bert.ATOL
ATOL = 1e-5
POSITIONS = ["learned", "sinusoidal", "alibi", "rope"]


def _tiny(position: str, **kw) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=99, max_positions=32, n_layer=2, n_head=4, dim=32, ff_dim=64, position=position,
                       dropout=0.0, **kw)
    return build(config).eval()


def test_gpt2_equals_transformers_with_left_padding(hf_tiny, make_batch):
    folder, hf = hf_tiny("gpt2")
    ours = from_hf(folder)
    ids, mask = make_batch(3, 9, side="left")
    # transformers' GPT-2 forward does not derive positions from the mask (its generate() does)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    assert torch.allclose(a.logits[keep], b.logits[keep], atol=ATOL, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == 3  # embeddings, block 1, final norm
    assert all(torch.allclose(x[keep], y[keep], atol=ATOL, rtol=0) for x, y in zip(a.hidden_states, b.hidden_states))


def test_gpt1_post_ln_without_final_norm_equals_transformers(hf_tiny):
    folder, hf = hf_tiny("gpt1")
    ours = from_hf(folder)
    assert ours.config.norm_placement == "post" and isinstance(ours.norm, nn.Identity)
    ids = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        a, b = hf(ids, output_hidden_states=True), ours(ids, output_hidden_states=True)
    assert torch.allclose(a.logits, b.logits, atol=ATOL, rtol=0)
    assert all(torch.allclose(x, y, atol=ATOL, rtol=0) for x, y in zip(a.hidden_states, b.hidden_states))


def test_head_is_tied_to_the_token_embedding():
    model = _tiny("learned")
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _tiny("learned", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decoding_equals_the_full_forward(position, make_batch):
    model = _tiny(position)
    ids, mask = make_batch(3, 10, side="left")
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # (B, T, V)
        prefix = 6
        out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(prefix, ids.shape[1]):  # one token at a time, the mask covering past + new
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert isinstance(cache, KVCache) and cache.length == ids.shape[1]
    keep = mask.bool()
    assert torch.allclose(torch.cat(steps, 1)[keep], full[keep], atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padding_gives_the_logits_of_the_unpadded_prompt(position):
    model = _tiny(position)
    torch.manual_seed(3)
    prompt = torch.randint(1, 99, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(prompt).logits
        batch = model(padded, attention_mask=mask).logits[:, 3:]
    assert torch.allclose(alone, batch, atol=ATOL, rtol=0)


def test_explicit_position_ids_override_the_mask():
    model = _tiny("learned")
    ids = torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        shifted = model(ids, position_ids=torch.tensor([[3, 4, 5, 6]])).logits
        plain = model(ids).logits
    assert not torch.allclose(shifted, plain, atol=1e-3)  # positions matter for learned embeddings


def test_use_cache_false_returns_no_cache():
    model = _tiny("rope")
    out = model(torch.randint(0, 50, (1, 3)))
    assert out.past_key_values is None and out.logits.shape == (1, 3, 99)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask: expected .* \\(2, 4\\)"),
    (dict(past_key_values=object()), TypeError, "past_key_values"),
])
def test_bad_decoder_inputs_are_named(kwargs, error, match):
    model = _tiny("learned")
    with pytest.raises(error, match=match):
        model(torch.zeros(2, 4, dtype=torch.long), **kwargs)


def test_gpt_rejects_a_foreign_config():
    from nanomm.models import LlamaConfig

    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(LlamaConfig(n_layer=1, dim=16, n_head=2, n_kv_head=2, ff_dim=8, vocab_size=10))


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_inputs_embeds_equal_token_ids(name):
    """BLIP-2 and LLaVA feed embeddings: the token embedding looked up outside must give the same logits."""
    from nanomm.models import build, preset
    from nanomm.models.generation import generate

    torch.manual_seed(0)
    model = build(preset(name, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    want = model(ids, attention_mask=mask).logits
    got = model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    a = generate(model, ids, mask, max_new_tokens=4).new_tokens
    b = generate(model, inputs_embeds=model.embed_tokens(ids), attention_mask=mask, max_new_tokens=4).new_tokens
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected exactly one of them, got both"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
