"""Chapter 16 runs quickly and measures RMSNorm against torch and LayerNorm (timings never asserted)."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch16_rmsnorm as ch16


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch16.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch16.ID, ch16.TITLE) == (16, "RMSNorm")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds", "approx", "holds", "holds"]


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())  # the report is JSON: no inf or NaN


def test_measured_figures(chapter):
    d = chapter.demo
    # float32 vs torch.nn.RMSNorm: same formula, a few ulp of O(1) outputs at most
    assert d["rmsnorm_vs_torch_max_diff"] < 1e-5
    assert d["rmsnorm_vs_notes_max_diff"] < 1e-12  # float64 both sides
    assert d["eps_convention_rel_gap_unit_scale"] < 1e-5 < 0.1 < d["eps_convention_rel_gap_ms_eq_eps"]
    assert (d["layernorm_params_768"], d["rmsnorm_params_768"]) == (1536, 768)
    assert d["rms_vs_ln_zero_mean_max_diff"] < 1e-12 < 1.0 < d["rms_vs_ln_mean3_max_diff"]
    assert chapter.plots and all(p.exists() for p in chapter.plots)
