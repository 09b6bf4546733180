"""Chapter 7 runs quickly and reaches the verdicts of audit.md §7 from nanomm's own numbers."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch07_position_encodings as ch07


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch07.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def _verdict(chapter, start):
    (claim,) = [c for c in chapter.claims if c.claim.startswith(start)]
    return claim.verdict


def test_identity():
    assert (ch07.ID, ch07.TITLE) == (7, "Position encodings")


@pytest.mark.parametrize("start,verdict", [
    ("Self-attention without positions is permutation invariant", "approx"),
    ("Sinusoidal encoding", "holds"),
    ("Learned positions", "holds"),
    ("Sinusoidal extrapolates", "wrong"),
    ("ALiBi adds", "approx"),
    ("With RoPE", "holds"),
    ("apply_rope", "wrong"),
    ("RoPE code pairs", "holds"),
])
def test_verdicts(chapter, start, verdict):
    assert _verdict(chapter, start) == verdict


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())  # the report is JSON: no inf or NaN


def test_attention_is_equivariant_not_invariant(chapter):
    d = chapter.demo
    assert d["equivariance_error"] < 1e-12  # float64: only summation order changes under a permutation
    assert d["invariance_gap"] > 0.1 and d["equivariance_gap_with_pe"] > 0.1


def test_measured_figures(chapter):
    d = chapter.demo
    assert d["sinusoidal_formula_max_diff"] < 1e-12 and d["sinusoidal_shift_is_rotation_err"] < 1e-12
    assert (d["alibi_slope_8_heads_first"], d["alibi_slope_8_heads_last"]) == (0.5, 1 / 256)
    assert d["rope_shift_rel_err_f64"] < 1e-12
    # float32 angles up to ~4100 rad are rounded by up to half an ulp, 2.4e-4 rad, which bounds |Δscore|/(|q||k|)
    assert d["rope_shift_rel_err_f32"] < 5e-4
    assert d["notes_apply_rope_max_diff_S_eq_H"] > 0.1
    assert d["rope_layout_max_diff_after_permute"] < 1e-12 and d["rope_layout_max_diff_without_permute"] > 0.1


def test_extrapolation_demo(chapter):
    d = chapter.demo
    # the lag-3 copy is easy inside the training length for every encoding (seeded, 100 Adam steps)
    assert min(d["learned_acc_len32"], d["sinusoidal_acc_len32"], d["rope_acc_len32"]) > 0.9
    # past it the sinusoidal model loses most of its accuracy
    assert d["sinusoidal_acc_positions_32_to_63"] < 0.8
    assert chapter.plots and all(p.exists() for p in chapter.plots)
