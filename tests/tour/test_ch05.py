"""Chapter 5 in quick mode: fp16's range from its bits, underflow without scaling, the loss-scale trace."""

from pathlib import Path

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch05_fp16 as ch05


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch05.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


EXPECTED = {
    "FP16's largest value is 65504": "holds",
    "FP16's smallest value is 6e-8": "approx",  # 6e-8 is the smallest subnormal; the smallest normal is 6.1e-5
    "FP16 has a 10-bit mantissa, FP32 23": "holds",
    "gradients easily underflow to 0 in FP16": "holds",
    "FP32 master weights: store and update in FP32": "holds",
    "dynamic loss scaling: grow while clean, shrink and skip on inf/NaN": "holds",
    "`from torch.cuda.amp import autocast, GradScaler`": "approx",  # deprecated for torch.amp
    "FP16 halves memory": "approx",  # activations only; Adam model states stay 16 B/param
}


def test_identity():
    assert ch05.ID == 5 and ch05.TITLE == "FP16 training"


def test_verdicts(chapter):
    got = {c.claim: c.verdict for c in chapter.claims}
    assert got == EXPECTED
    range_claim = next(c for c in chapter.claims if c.claim == "FP16's smallest value is 6e-8")
    assert "5.96e-08" in range_claim.nanomm and "6.1e-05" in range_claim.nanomm
    assert "torch.amp.GradScaler('cuda'" in next(c.nanomm for c in chapter.claims if "torch.cuda.amp" in c.claim)


def test_underflow_demo(chapter):
    d = chapter.demo
    assert d["zeroed_grad_fraction_S=1"] > 0.99
    assert d["zeroed_grad_fraction_S=2^16"] < 0.01
    assert d["zeroed_grad_fraction_S=1"] > d["zeroed_grad_fraction_S=1024"] > d["zeroed_grad_fraction_S=2^16"]


def test_loss_scale_trace_and_memory(chapter):
    d = chapter.demo
    assert d["trace_equals_grad_scaler"] == 1.0
    assert d["trace_natural_overflows"] >= 1  # S = 2^24 is too high for these gradients
    assert d["trace_skipped"] == d["trace_natural_overflows"] + 2  # plus the two injected ones
    assert d["model_states_B_per_param_fp32"] == d["model_states_B_per_param_fp16"] == 16.0
    assert 0.45 < d["activation_ratio_fp16_vs_fp32"] < 0.8  # halved, except the fp32 islands (LayerNorm)
    (plot,) = chapter.plots
    assert Path(plot).name == "ch05_loss_scale_trace.png" and Path(plot).read_bytes()[:4] == b"\x89PNG"
