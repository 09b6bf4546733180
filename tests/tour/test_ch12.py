"""Chapter 12 runs quickly and shows where the notes' BCE and InfoNCE break."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch12_bce_infonce as ch12


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch12.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch12.ID, ch12.TITLE) == (12, "BCE and InfoNCE")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["approx", "holds", "wrong", "wrong", "approx", "holds"]


def test_bce_float16(chapter):
    d = chapter.demo
    assert d["bce_f64_vs_torch"] < 1e-12
    assert d["fp16_one_minus_eps"] == 1.0 and d["fp16_notes_bce_finite"] == 0.0
    # σ(12) saturates; the logits form keeps the exact answers 12 + log1p(e^-12) and log1p(e^-12) ≈ 6.1e-6
    assert d["fp16_bce_with_logits_wrong_label"] == pytest.approx(12.0, rel=1e-3)
    assert d["fp16_bce_with_logits_right_label"] == pytest.approx(math.log1p(math.exp(-12)), rel=1e-2)


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())


def test_info_nce(chapter):
    d = chapter.demo
    assert d["info_nce_vs_cross_entropy"] < 1e-12
    assert d["notes_info_nce_f32_finite"] == 0.0
    assert math.isfinite(d["info_nce_f32"]) and math.isfinite(d["info_nce_f64_large_logits"])
    assert d["cosine_loss_scale1"] == pytest.approx(d["cosine_loss_scale10"], rel=1e-12)
    assert abs(d["notes_loss_scale10"] - d["notes_loss_scale1"]) > 1.0
    assert d["info_nce_symmetric"] == pytest.approx((d["info_nce_image_to_text"] + d["info_nce_text_to_image"]) / 2)
    assert d["entropy_tau_0.07"] < d["entropy_tau_1"]
    assert d["hardest_negative_share_tau_0.07"] > d["hardest_negative_share_tau_1"]
    assert chapter.plots and all(p.exists() for p in chapter.plots)
