"""Houlsby adapters: two per layer (attention output, FFN output), identity at init, not mergeable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanomm import peft
from nanomm.peft.adapter import AdapterWrapped


def _ids():
    return torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.prediction_logits


@pytest.mark.parametrize("family", ["llama", "gpt", "bert"])
def test_two_adapters_per_layer_and_identity_at_init(tiny, family):
    model = tiny(family)
    ids = _ids()
    with torch.no_grad():
        before = _out(model, ids)
        report = peft.apply(model, peft.AdapterConfig(bottleneck=8))
        after = _out(model, ids)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # up = 0: h + 0 exactly
    layers = "layers" if family == "bert" else "blocks"
    prefix = "bert." if family == "bert" else ""
    assert report.targets == [f"{prefix}{layers}.{i}.{m}" for i in range(2) for m in ("attn.o_proj", "mlp")]
    d, m = 32, 8
    assert report.trainable == 4 * (2 * d * m + m + d)  # down (m·d + m) and up (d·m + d), 4 adapters


def test_forward_is_h_plus_up_act_down_h():
    torch.manual_seed(0)
    layer = AdapterWrapped(nn.Linear(6, 6), 6, 3, "relu")
    nn.init.normal_(layer.adapter.up.weight)
    x = torch.randn(2, 6)
    h = layer.base(x)
    expected = h + layer.adapter.up(torch.relu(layer.adapter.down(h)))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_trained_adapter_changes_output_and_can_be_disabled_not_merged(tiny):
    model = tiny("llama")
    ids = _ids()
    with torch.no_grad():
        base = _out(model, ids)
    peft.apply(model, peft.AdapterConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter.up" in n:
                p.normal_(0, 0.5)
        adapted = _out(model, ids)
        with peft.disable_adapters(model):
            disabled = _out(model, ids)
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    with pytest.raises(ValueError, match="nonlinear and cannot be merged"):
        peft.merge(model)
    with pytest.raises(ValueError, match="nonlinear and cannot be merged"):
        peft.merge_and_unload(model)
