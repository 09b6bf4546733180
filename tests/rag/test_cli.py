"""`nanomm rag index | search | ask | eval` through typer's runner (a BM25-only index keeps it fast)."""

import json

import pytest
from typer.testing import CliRunner

from nanomm.rag.cli import rag_app

runner = CliRunner()


@pytest.fixture(scope="module")
def index_dir(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ix"
    r = runner.invoke(rag_app, ["index", str(corpus_dir), "--out", str(out), "--no-dense", "--chunk-size", "40"])
    assert r.exit_code == 0, r.output
    assert "indexed 3 files" in r.output
    return out


def test_search_json_gives_text_source_offsets_score(index_dir, corpus_dir):
    r = runner.invoke(rag_app, ["search", "What does k1 control?", "--index", str(index_dir), "--k", "2", "--mode", "bm25", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert {"text", "source", "start", "end", "score"} <= set(hits[0])
    text = (corpus_dir / "rag.md").read_text(encoding="utf-8")
    assert hits[0]["source"].endswith("rag.md") and text[hits[0]["start"]:hits[0]["end"]] == hits[0]["text"]


def test_search_table_and_errors(index_dir):
    r = runner.invoke(rag_app, ["search", "RMSNorm", "--index", str(index_dir), "--mode", "bm25"])
    assert r.exit_code == 0 and "norm.md" in r.output
    r = runner.invoke(rag_app, ["search", "RMSNorm", "--index", str(index_dir), "--mode", "hybrid"])
    assert r.exit_code != 0 and "dense" in r.output
    r = runner.invoke(rag_app, ["search", "x", "--index", str(index_dir), "--mode", "psychic"])
    assert r.exit_code != 0 and "expected one of" in r.output


def test_ask_answers_with_citations_or_abstains(index_dir):
    r = runner.invoke(rag_app, ["ask", "Does RMSNorm subtract the mean?", "--index", str(index_dir)])
    assert r.exit_code == 0, r.output
    assert "subtract the mean" in r.output and "[1]" in r.output
    r = runner.invoke(rag_app, ["ask", "Who won the 2022 World Cup?", "--index", str(index_dir), "--json"])
    assert json.loads(r.output)["abstained"] is True
    r = runner.invoke(rag_app, ["ask", "q", "--index", str(index_dir), "--generator", "openai"])
    assert r.exit_code != 0 and "--base-url" in r.output


def test_eval_prints_each_mode_side_by_side(index_dir, corpus_dir, tmp_path):
    rows = [{"question": "What does k1 control in BM25?", "relevant": [{"source": "rag.md", "anchor": "controlled by k1"}]},
            {"question": "Who painted the Mona Lisa?", "relevant": []}]
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(x) for x in rows), encoding="utf-8")
    import os

    cwd = os.getcwd()
    os.chdir(corpus_dir)  # anchors resolve relative to the working directory
    try:
        r = runner.invoke(rag_app, ["eval", str(q), "--index", str(index_dir), "--k", "3"])
        j = runner.invoke(rag_app, ["eval", str(q), "--index", str(index_dir), "--json"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())  # rich wraps lines to the terminal width
    assert "bm25+rm3" in out and "R@3" in out and "abstains on 100% of 1 unanswerable" in out
    result = json.loads(j.output)
    assert set(result["modes"]) == {"bm25", "bm25+rm3"} and result["modes"]["bm25"]["all"]["recall"] == 1.0
