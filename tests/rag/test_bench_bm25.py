"""`nanomm bench bm25 --quick` runs, agrees with bm25s at every rank, and reports ratios (never asserted on)."""

import json

import pytest


def test_bench_bm25_quick(tmp_path):
    pytest.importorskip("bm25s")
    pytest.importorskip("rank_bm25")
    from nanomm.bench.bm25 import run

    result = run(quick=True, out_dir=tmp_path)
    assert set(result["libraries"]) == {"nanomm", "bm25s", "rank_bm25"}
    assert result["n_docs"] > 500 and result["n_queries"] == 300
    agree, total = map(int, result["top10_scores_equal_to_bm25s"].split("/"))
    assert agree == total  # same formula, same tokens: the same score at every rank
    assert result["index_time_vs_bm25s"] > 0 and result["queries_per_s_vs_bm25s"] > 0
    assert json.loads((tmp_path / "bm25.json").read_text())["n_docs"] == result["n_docs"]
