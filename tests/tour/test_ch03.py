"""Chapter 3 runs quickly and reaches the verdicts of audit.md §3 from nanomm's own numbers."""

from __future__ import annotations

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch03_flash_attention as ch03


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch03.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch03.ID, ch03.TITLE) == (3, "FlashAttention")


@pytest.mark.parametrize("start, verdict", [
    ("At N = 4096 the fp16 attention matrix", "holds"),
    ("Online softmax", "wrong"),
    ("FlashAttention cuts attention memory", "holds"),
    ("FlashAttention is mathematically equivalent", "holds"),
    ("FlashAttention is 2–4× faster", "unverifiable"),
])
def test_verdicts(chapter, start, verdict):
    (claim,) = [c for c in chapter.claims if c.claim.startswith(start)]
    assert claim.verdict == verdict


def test_score_matrix_is_32_mib_and_flash_never_holds_it(chapter):
    d = chapter.demo
    assert d["score_matrix_mib_n4096_fp16"] == 32.0  # 4096² × 2 B, read off the tensor naive attention creates
    assert d["flash_largest_tensor_mib_n4096"] <= 2.0  # one fp32 tile of 256 × 1024 is 1 MiB


def test_notes_recurrence_error_against_the_rescaled_one(chapter):
    d = chapter.demo
    assert d["notes_version_max_abs_err"] > 0.05  # a visibly wrong output, not rounding
    assert d["flash_fp64_max_abs_err"] < 1e-12  # float64: rounding only


def test_memory_growth(chapter):
    d = chapter.demo
    assert d["naive_memory_exponent"] > 1.7 and d["flash_memory_exponent"] < 1.2
    assert d["flash_peak_mib_T1024"] * 4 < d["naive_peak_mib_T1024"]


def test_exactness_by_flashattention_rule(chapter):
    d = chapter.demo
    assert d["flash_fp32_max_abs_err"] <= 2 * d["naive_fp32_max_abs_err"]
    assert d["flash_bf16_max_abs_err"] <= 2 * d["naive_bf16_max_abs_err"]


def test_claims_carry_computed_figures_and_a_plot(chapter):
    assert all(c.nanomm and c.source for c in chapter.claims)
    assert "32 MiB" in chapter.claims[0].nanomm
    (plot,) = chapter.plots
    assert plot.exists() and plot.stat().st_size > 10_000
