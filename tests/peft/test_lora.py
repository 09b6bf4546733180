"""LoRA: unchanged at initialisation, the formula, dropout on the low-rank path only, merge/unmerge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from nanomm import peft
from nanomm.peft.layer import PeftLayer
from nanomm.peft.lora import LoraLinear


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.prediction_logits


def _ids(n=2, t=7):
    return torch.randint(0, 99, (n, t), generator=torch.Generator().manual_seed(0))


def _randomise_B(model, scale=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["llama", "gpt", "bert"])
def test_model_is_unchanged_at_init(tiny, family):
    model = tiny(family)
    ids = _ids()
    with torch.no_grad():
        before = _out(model, ids)
        peft.apply(model, peft.LoraConfig(r=4, alpha=8.0, target_modules="all-linear"))
        after = _out(model, ids)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # B = 0: exactly, not approximately


def test_init_kaiming_uniform_A_and_zero_B():
    layer = LoraLinear(nn.Linear(64, 48), r=16, alpha=16.0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in
    A = layer.lora_A.weight.detach()
    assert A.shape == (16, 64) and layer.lora_B.weight.shape == (48, 16)
    assert float(A.abs().max()) <= bound
    assert float(A.abs().max()) > 0.9 * bound  # 1024 uniform draws: P(max < 0.9·bound) = 0.9^1024
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_Wx_plus_scaled_BAx(rslora):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(5, 7), r=3, alpha=6.0, use_rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5)
    scale = 6.0 / (math.sqrt(3) if rslora else 3)
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)  # float32, a handful of terms


def test_dropout_acts_on_the_lora_path_only():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 6), r=2, alpha=2.0, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same dropout mask, drawn by hand
    expected = layer.base(x) + layer.lora_B(layer.lora_A(F.dropout(x, 0.5, training=True))) * layer.scaling
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y, layer.base(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling)


@pytest.mark.parametrize("r, alpha, rslora", [(1, 1.0, False), (4, 16.0, False), (8, 8.0, True)])
def test_merged_and_unmerged_outputs_agree(tiny, r, alpha, rslora):
    model = tiny("llama")
    peft.apply(model, peft.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules="all-linear"))
    _randomise_B(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    ids = _ids()
    with torch.no_grad():
        unmerged = _out(model, ids)
        peft.merge(model)
        peft.merge(model)  # merging twice must not add the update twice
        merged = _out(model, ids)
        peft.unmerge(model)
        again = _out(model, ids)
    # merging only changes the order of float32 sums: a few ulps on logits of size ~1
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)  # W + Δ − Δ, one rounding each way


def test_safe_merge_refuses_nan_and_inf_and_changes_nothing(tiny):
    model = tiny("llama")
    peft.apply(model, peft.LoraConfig(target_modules="all-linear"))
    _randomise_B(model)
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.lora_B.weight[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN or inf"):
        peft.merge(model)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, PeftLayer))
    for n, p in model.named_parameters():  # all or nothing: layers merged before the bad one were undone
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0, equal_nan=True)


def test_merge_and_unload_gives_the_plain_model_back(tiny):
    model = tiny("llama")
    keys = list(model.state_dict())
    peft.apply(model, peft.LoraConfig(target_modules="all-linear"))
    _randomise_B(model)
    ids = _ids()
    with torch.no_grad():
        adapted = _out(model, ids)
        plain = peft.merge_and_unload(model)
        merged = _out(plain, ids)
    assert plain is model and list(model.state_dict()) == keys  # hub.to_hf can write it again
    assert not any(isinstance(m, PeftLayer) for m in model.modules())
    assert peft.peft_config(model) is None
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_only_the_lora_matrices_get_gradients(tiny):
    model = tiny("llama").train()
    peft.apply(model, peft.LoraConfig())
    _out(model, _ids()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    # at init B = 0, so A's gradient (through B) is zero while B's is not
    layer = model.blocks[0].attn.q_proj
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 6),
       alpha=st.floats(0.1, 32.0), seed=st.integers(0, 2**16))
def test_merge_is_exact_up_to_rounding(d_in, d_out, r, alpha, seed):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(d_in, d_out), r=r, alpha=alpha)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, d_in)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    # float32 with entries O(1)·alpha/r: the difference is a few ulps of the largest term
    scale = 1.0 + float(unmerged.abs().max())
    torch.testing.assert_close(merged, unmerged, atol=1e-5 * scale, rtol=0)
