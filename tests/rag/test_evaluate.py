"""Retrieval metrics by hand, question loading with anchors, and the shipped question set."""

import json
from types import SimpleNamespace as NS

import pytest

from nanomm.rag.evaluate import Span, abstention, default_corpus, default_questions, evaluate, load_questions, metrics, same_source


def hit(source, start, end):
    return NS(chunk=NS(source=source, start=start, end=end))


REL = [Span("docs/a.md", 100, 200), Span("docs/b.md", 0, 50)]


@pytest.mark.parametrize("hits, expected", [
    ([hit("x/docs/a.md", 150, 300), hit("docs/b.md", 40, 90)], {"recall": 1.0, "mrr": 1.0, "ndcg": 1.0}),
    ([hit("docs/c.md", 0, 900), hit("docs/a.md", 0, 101)], {"recall": 0.5, "mrr": 0.5, "ndcg": (1 / 1.5849625) / (1 + 1 / 1.5849625)}),
    # two chunks overlapping one span earn it once: the second adds nothing
    ([hit("docs/a.md", 100, 120), hit("docs/a.md", 110, 130)], {"recall": 0.5, "mrr": 1.0, "ndcg": 1 / (1 + 1 / 1.5849625)}),
    ([hit("docs/a.md", 200, 300), hit("docs/b.md", 50, 60)], {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}),  # touching is not overlapping
])
def test_metrics_by_hand(hits, expected):
    got = metrics(hits, REL, k=5)
    assert got == pytest.approx(expected)


def test_cut_off_k():
    hits = [hit("docs/c.md", 0, 1), hit("docs/a.md", 120, 130)]
    assert metrics(hits, REL, k=1) == {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}


@pytest.mark.parametrize("a, b, same", [("docs/topics/19-rag.md", "/repo/docs/topics/19-rag.md", True),
                                        ("19-rag.md", "docs/topics/19-rag.md", True),
                                        ("docs/topics/19-rag.md", "other/19-rag.md", False)])
def test_same_source(a, b, same):
    assert same_source(a, b) is same


def test_anchors_resolve_at_load_time_and_missing_ones_are_reported(tmp_path):
    (tmp_path / "d.md").write_text("intro\n\nBM25 scores a document by\nterm frequency.", encoding="utf-8")
    rows = [{"question": "How does BM25 score?", "relevant": [{"source": "d.md", "anchor": "scores a document by term frequency"}]},
            {"question": "Span given?", "relevant": [{"source": "d.md", "start": 0, "end": 5}]},
            {"question": "Gone?", "relevant": [{"source": "d.md", "anchor": "not in the file"}]},
            {"question": "Which file?", "relevant": [{"source": "nope.md", "anchor": "x"}]},
            {"question": "Unanswerable?", "relevant": []}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    questions, problems = load_questions(path, roots=[tmp_path])
    text = (tmp_path / "d.md").read_text(encoding="utf-8")
    s = questions[0].relevant[0]
    assert text[s.start:s.end] == "scores a document by\nterm frequency"  # found across the line break
    assert [q.question for q in questions] == ["How does BM25 score?", "Span given?", "Unanswerable?"]
    assert not questions[2].answerable and questions[0].lang == "en"
    assert len(problems) == 2 and "anchor not found" in problems[0] and "file not found" in problems[1]


def test_evaluate_and_abstention_on_the_test_corpus(dense_index, tmp_path):
    rows = [{"question": "What does k1 control in BM25?", "relevant": [{"source": "rag.md", "anchor": "controlled by k1"}]},
            {"question": "什么是大模型幻觉？", "relevant": [{"source": "norm.md", "anchor": "大模型幻觉是指"}]},
            {"question": "Who painted the Mona Lisa?", "relevant": []}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    corpus = dense_index.chunks[0].source.rsplit("/", 1)[0]
    questions, problems = load_questions(path, roots=[corpus])
    assert not problems
    result = evaluate(dense_index, questions, ["bm25", "hybrid"], k=3)
    assert result["bm25"]["all"]["n"] == 2 and result["bm25"]["zh"]["n"] == 1
    assert result["hybrid"]["all"]["recall"] == 1.0 and result["hybrid"]["all"]["mrr"] == 1.0
    report = abstention(dense_index, questions, k=3)
    assert report["abstained_when_unanswerable"] == 1.0 and report["answered_when_answerable"] == 1.0
    assert report["languages"]["en"]["best"]["balanced_accuracy"] == 1.0
    assert "best" not in report["languages"]["zh"]  # no unanswerable Chinese question to calibrate on
    assert report["languages"]["zh"]["threshold"] < report["languages"]["en"]["threshold"]


def test_the_shipped_question_set_resolves_against_docs_topics():
    """Every anchor of the shipped set must still be in docs/topics: edit the set when a page changes."""
    if not default_corpus().is_dir():
        pytest.skip("not a source checkout: docs/topics is absent")
    questions, problems = load_questions(default_questions())
    assert problems == []
    assert sum(q.answerable for q in questions) >= 30 and sum(not q.answerable for q in questions) >= 8
    assert {q.lang for q in questions} == {"en", "zh"}
