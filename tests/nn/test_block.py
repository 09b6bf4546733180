"""The transformer block: each placement computes its formula; cross-attention; names are checked."""

from __future__ import annotations

import pytest
import torch

from nanomm.nn.block import Block


def _block(**kw) -> Block:
    torch.manual_seed(0)
    return Block(16, 4, 32, **kw).eval()


def _attn(b: Block, h):
    return b.attn(h)


@pytest.mark.parametrize("placement, formula", [
    ("pre", lambda b, x: (lambda y: y + b.mlp(b.norm2(y)))(x + _attn(b, b.norm1(x)))),
    ("post", lambda b, x: (lambda y: b.norm2(y + b.mlp(y)))(b.norm1(x + _attn(b, x)))),
])
def test_placements_compute_their_formula(placement, formula):
    block = _block(placement=placement)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(block(x), formula(block, x), atol=1e-6)  # float32, same ops in the same order


def test_llama_style_block_has_rmsnorm_swiglu_gqa_and_no_bias():
    block = _block(norm="rms", ffn="swiglu", bias=False, n_kv_head=2)
    names = {n for n, _ in block.named_parameters()}
    assert not any(n.endswith("bias") for n in names)
    assert {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"} <= names
    assert block.attn.k_proj.weight.shape == (8, 16)  # 2 kv heads × head dim 4


def test_cross_attention_reads_the_context():
    block = _block(cross_dim=24)
    x = torch.randn(1, 3, 16)
    c1, c2 = torch.randn(1, 7, 24), torch.randn(1, 7, 24)
    with torch.no_grad():
        assert not torch.allclose(block(x, context=c1), block(x, context=c2))
        assert torch.allclose(block(x, context=c1), block(x, context=c1))
        mask = torch.zeros(1, 1, 1, 7, dtype=torch.bool)
        mask[..., :3] = True  # only the first three context tokens are visible
        c3 = c1.clone()
        c3[:, 3:] += 5.0
        assert torch.allclose(block(x, context=c1, context_mask=mask), block(x, context=c3, context_mask=mask),
                              atol=1e-6)


def test_context_without_cross_attention_is_an_error():
    with pytest.raises(ValueError, match="context"):
        _block()(torch.randn(1, 2, 16), context=torch.randn(1, 3, 16))


@pytest.mark.parametrize("kw, name", [(dict(norm="batch"), "norm"), (dict(ffn="geglu"), "ffn"),
                                      (dict(placement="sandwich"), "placement")])
def test_unknown_variants_are_named(kw, name):
    with pytest.raises(ValueError, match=f"^{name}: expected one of"):
        _block(**kw)
