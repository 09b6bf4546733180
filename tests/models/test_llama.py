"""LLaMA (RMSNorm, SwiGLU, RoPE, GQA, no biases) against transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from nanomm.models import Llama, build, count_params, from_hf, preset
from nanomm.nn.norm import RMSNorm

# float32 with two tiny layers: differences are summation order only (~1e-7); see test_bert.ATOL
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair(hf_tiny):
    folder, hf = hf_tiny("llama")
    return from_hf(folder), hf


def test_config_is_read_with_gqa_and_rope_base(pair):
    ours, hf = pair
    c = ours.config
    assert (c.n_head, c.n_kv_head, c.rope_base) == (4, 2, 500.0)
    assert ours.blocks[0].attn.k_proj.weight.shape == (2 * 8, 32)  # two kv heads of dim 8


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_hidden_states_equal_transformers(pair, make_batch, side):
    ours, hf = pair
    ids, mask = make_batch(3, 9, side=side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    assert torch.allclose(a.logits[keep], b.logits[keep], atol=ATOL, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states)
    assert all(torch.allclose(x[keep], y[keep], atol=ATOL, rtol=0) for x, y in zip(a.hidden_states, b.hidden_states))


def test_cached_decoding_equals_transformers_full_forward(pair):
    ours, hf = pair
    torch.manual_seed(5)
    ids = torch.randint(0, 99, (2, 12))
    with torch.no_grad():
        full = hf(ids).logits
        out = ours(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 12):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_no_biases_rmsnorm_and_untied_head():
    model = build(preset("llama-tiny"))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert isinstance(model.norm, RMSNorm) and all(isinstance(b.norm1, RMSNorm) for b in model.blocks)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config).total


def test_llama_accepts_only_its_config():
    with pytest.raises(TypeError, match="LlamaConfig"):
        Llama(preset("gpt-tiny"))
