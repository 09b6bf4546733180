"""`nanomm bench bm25`: nanomm's BM25 against bm25s and rank_bm25, same corpus, same tokens, one run.

Corpus (all of it ships with Python): the language reference topics (``pydoc_data.topics``) and, unless
--quick, every docstring of the standard library's modules, classes and functions; cut by nanomm's
chunker into passages of at most 64 words, duplicates dropped, analysed once by nanomm's English
analyser. Every library receives the same token lists, so only indexing and scoring are timed.
Queries: 8-token windows of random passages (seeded).

Reported: index seconds and queries/s for each library, ratios against bm25s (the goal: nanomm's
queries/s >= bm25s's, index time <= 1.5x bm25s's), and whether the top-10 lists agree with bm25s's
(they must: the formulas are the same). rank_bm25 scores every document in Python per query, so it
gets fewer queries; its queries/s is still per query.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nanomm.rag.analysis import make_analyzer
from nanomm.rag.bm25 import BM25
from nanomm.rag.chunking import Chunker
from nanomm.rag.store import write_json

K = 10


def _docstrings() -> list[str]:
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        out.extend(d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node)))
    return out


def _corpus(quick: bool) -> tuple[str, list[list[str]]]:
    import pydoc_data.topics

    bodies = list(pydoc_data.topics.topics.values())
    name = "pydoc_data.topics"
    if not quick:
        bodies += _docstrings()
        name += " + standard-library docstrings"
    chunker = Chunker(size=64, overlap=0)
    analyse = make_analyzer("english")
    texts = list(dict.fromkeys(c.text for body in bodies for c in chunker.chunk(body)))  # drop duplicates
    docs = [d for d in map(analyse, texts) if d]
    return name + ", 64-word passages", docs


def _queries(docs: list[list[str]], n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(docs), n):
        d = docs[i]
        s = int(rng.integers(0, max(1, len(d) - 8)))
        out.append(d[s: s + 8])
    return out


def _time(fn) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def run(quick: bool = False, out_dir: Path = Path("bench-out"), console=None) -> dict:
    import bm25s
    from rank_bm25 import BM25Okapi

    corpus_name, docs = _corpus(quick)
    queries = _queries(docs, 300 if quick else 2000)
    few = queries[: 20 if quick else 50]
    result: dict = {"corpus": corpus_name, "n_docs": len(docs),
                    "n_tokens": int(sum(map(len, docs))), "n_queries": len(queries), "k": K, "variant": "lucene"}

    t_ours, ours = _time(lambda: BM25(k1=1.5, b=0.75, variant="lucene").index_tokens(docs))
    ref = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    t_ref, _ = _time(lambda: ref.index(docs, show_progress=False))
    t_rank, rank = _time(lambda: BM25Okapi(docs, k1=1.5, b=0.75))

    q_ours, hits_ours = _time(lambda: [ours.search(q, K) for q in queries])
    q_ref, (_, ref_scores) = _time(lambda: ref.retrieve(queries, k=K, show_progress=False))
    q_rank, _ = _time(lambda: [np.argsort(-rank.get_scores(q))[:K] for q in few])

    # Agreement: the same score at every rank (documents tied on a score may come in another order).
    # 1e-5 relative: both sum the same float32 weights, in a different order.
    agree = sum(np.allclose([s for _, s in h], r[: len(h)], rtol=1e-5, atol=0) for h, r in zip(hits_ours, ref_scores))
    rows = {"nanomm": (t_ours, len(queries) / q_ours), "bm25s": (t_ref, len(queries) / q_ref),
            "rank_bm25": (t_rank, len(few) / q_rank)}
    result["libraries"] = {name: {"index_s": round(i, 4), "queries_per_s": round(q, 1)} for name, (i, q) in rows.items()}
    result["index_time_vs_bm25s"] = round(t_ours / t_ref, 3)
    result["queries_per_s_vs_bm25s"] = round((len(queries) / q_ours) / (len(queries) / q_ref), 3)
    result["top10_scores_equal_to_bm25s"] = f"{agree}/{len(queries)}"
    result["goals_met"] = {"queries_per_s >= bm25s": result["queries_per_s_vs_bm25s"] >= 1.0,
                           "index_time <= 1.5x bm25s": result["index_time_vs_bm25s"] <= 1.5}

    out_dir = Path(out_dir)
    write_json(out_dir / "bm25.json", result)
    if console is not None:
        from rich.table import Table

        table = Table(title=f"BM25 on {result['n_docs']:,} passages ({result['n_tokens']:,} tokens), top-{K}")
        for col in ("library", "index (s)", "queries/s", "index vs bm25s", "queries/s vs bm25s"):
            table.add_column(col, justify="right" if col != "library" else "left")
        for name, (i, q) in rows.items():
            table.add_row(name, f"{i:.4f}", f"{q:,.0f}", f"{i / t_ref:.2f}x", f"{q / rows['bm25s'][1]:.2f}x")
        console.print(table)
        console.print(f"top-10 scores equal to bm25s's at every rank: {result['top10_scores_equal_to_bm25s']}; goals: {result['goals_met']}")
    return result
