"""Fusion (RRF with weights, score fusion) and query rewriting (RM3, multi-query parsing)."""

import math

import pytest

from nanomm.rag.fusion import fuse, rrf, score_fusion
from nanomm.rag.rewrite import parse_queries, rm3

RUNS = {"bm25": [(1, 9.0), (2, 5.0), (3, 1.0)], "dense": [(3, 0.9), (1, 0.8), (4, 0.1)]}


def test_rrf_by_hand():
    fused = dict(rrf(RUNS, k_rrf=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62) and fused[4] == pytest.approx(1 / 63)
    assert [d for d, _ in rrf(RUNS)] == [1, 3, 2, 4]


@pytest.mark.parametrize("weights, first", [({"bm25": 1.0, "dense": 0.0}, [1, 2, 3]), ({"bm25": 0.0, "dense": 1.0}, [3, 1, 4]),
                                            ({"bm25": 1.0, "dense": 3.0}, [3, 1, 4])])
def test_rrf_honours_weights(weights, first):
    assert [d for d, _ in rrf(RUNS, weights)][:3] == first


def test_score_fusion_minmax_by_hand():
    fused = dict(score_fusion(RUNS, {"bm25": 0.5, "dense": 0.5}))
    # bm25 min-max: 1 -> 1, 2 -> 0.5, 3 -> 0;  dense: 3 -> 1, 1 -> 0.875, 4 -> 0; missing -> 0
    assert fused[1] == pytest.approx(0.5 * 1 + 0.5 * 0.875)
    assert fused[3] == pytest.approx(0.5 * 0 + 0.5 * 1)
    assert fused[2] == pytest.approx(0.25) and fused[4] == pytest.approx(0.0)


def test_zscore_fusion_and_ties_are_deterministic():
    runs = {"a": [(5, 1.0), (2, 1.0)], "b": [(2, 3.0), (5, 3.0)]}
    assert [d for d, _ in score_fusion(runs, norm="zscore")] == [2, 5]  # equal scores: lower id first
    assert [d for d, _ in fuse(runs, "rrf")] == [2, 5]


@pytest.mark.parametrize("call, match", [
    (lambda: rrf({}), "runs"), (lambda: rrf(RUNS, {"sparse": 1.0}), "weights"),
    (lambda: rrf(RUNS, {"bm25": -1.0}), "weights"), (lambda: score_fusion(RUNS, norm="l2"), "norm"),
    (lambda: fuse(RUNS, "max"), "method"), (lambda: rrf(RUNS, k_rrf=-1), "k_rrf"),
])
def test_fusion_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rm3_by_hand():
    # two feedback docs, scores 3 and 1 -> P(q|d) = 0.75, 0.25
    feedback = [(["bm25", "saturation", "saturation", "k1"], 3.0), (["bm25", "idf"], 1.0)]
    q = rm3(["bm25"], feedback, n_terms=10, lam=0.5)
    rel = {"bm25": 0.25 * 0.75 + 0.5 * 0.25, "saturation": 0.5 * 0.75, "k1": 0.25 * 0.75, "idf": 0.5 * 0.25}
    z = sum(rel.values())
    assert q["bm25"] == pytest.approx(0.5 + 0.5 * rel["bm25"] / z)
    assert q["saturation"] == pytest.approx(0.5 * rel["saturation"] / z)
    assert math.isclose(sum(q.values()), 1.0)


def test_rm3_limits():
    feedback = [(["a", "b", "c"], 1.0)]
    assert rm3(["q"], feedback, lam=1.0) == {"q": 1.0}  # all weight on the original query
    assert set(rm3(["q"], feedback, n_terms=1, lam=0.0)) == {"a"}  # only the heaviest term (ties: alphabetical)
    assert rm3(["q"], [], lam=0.3) == {"q": 1.0}  # no feedback: nothing to add
    with pytest.raises(ValueError, match="lam"):
        rm3(["q"], feedback, lam=2)


def test_rm3_mode_finds_a_chunk_the_query_words_miss(bm25_index):
    # "FAISS" only: RM3 adds the feedback chunk's words, and the ranking stays led by that chunk
    plain = bm25_index.search("FAISS", 3, "bm25")
    expanded = bm25_index.search("FAISS", 3, "bm25+rm3")
    assert expanded[0].chunk.id == plain[0].chunk.id


def test_parse_queries():
    text = "1. How does BM25 weigh terms?\n- what is k1\n\n2) how does bm25 weigh terms?\nextra one\nfifth"
    assert parse_queries(text, "What is BM25?", n=3) == ["What is BM25?", "How does BM25 weigh terms?", "what is k1", "extra one"]
