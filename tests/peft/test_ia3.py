"""(IA)³: ones at init, keys/values scaled at the output, the FFN activation at the down-projection's input,
mergeable into the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanomm import peft
from nanomm.peft.ia3 import IA3Linear


def _ids():
    return torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.prediction_logits


@pytest.mark.parametrize("family, n_targets", [("llama", 6), ("gpt", 6), ("bert", 6)])
def test_default_targets_keys_values_and_ffn_and_identity_at_init(tiny, family, n_targets):
    model = tiny(family)
    ids = _ids()
    with torch.no_grad():
        before = _out(model, ids)
        report = peft.apply(model, peft.IA3Config())
        after = _out(model, ids)
    assert len(report.targets) == n_targets
    assert all(t.endswith(("k_proj", "v_proj", "down_proj", "fc_out")) for t in report.targets)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # × 1.0 is exact


@pytest.mark.parametrize("feedforward", [False, True])
def test_scales_output_or_input(feedforward):
    torch.manual_seed(0)
    layer = IA3Linear(nn.Linear(5, 3), feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(4, 5)
    W, b, s = layer.base.weight, layer.base.bias, layer.ia3_l
    expected = (x * s) @ W.T + b if feedforward else (x @ W.T + b) * s
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.ia3_l.dim() == 1  # the trainer's AdamW puts 1-D tensors in the no-decay group


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_merge_and_unmerge(tiny, family):
    model = tiny(family)
    peft.apply(model, peft.IA3Config())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("ia3_l"):
                p.uniform_(0.5, 1.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    ids = _ids()
    with torch.no_grad():
        scaled = _out(model, ids)
        peft.merge(model)
        merged = _out(model, ids)
        peft.unmerge(model)
        unmerged = _out(model, ids)
    # diag(l)·W vs l ⊙ (W x): float32 rounding only, logits of size ~1
    torch.testing.assert_close(merged, scaled, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, scaled, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], atol=1e-6, rtol=1e-6)  # (W·l)/l: one rounding each way


def test_unmerge_refuses_a_zero_scale():
    layer = IA3Linear(nn.Linear(4, 4), feedforward=False)
    with torch.no_grad():
        layer.ia3_l[2] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="scale is exactly 0"):
        layer.unmerge()


def test_feedforward_modules_must_be_targets(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="feedforward_modules: expected a subset of the target modules"):
        peft.apply(model, peft.IA3Config(target_modules=["k_proj", "v_proj"]))
    assert not peft.has_adapters(model)
    assert all(p.requires_grad for p in model.parameters())  # a failed apply leaves the model as it was
