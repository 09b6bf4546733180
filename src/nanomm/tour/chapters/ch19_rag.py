"""Topic 19, RAG: retrieve, then generate. The notes' retriever choices, measured on nanomm's own docs.

The corpus is docs/topics (the pages of this project), the questions are nanomm's labelled set in
English and Chinese; every figure comes from nanomm.rag at run time: recall@5, MRR and nDCG@5 for
BM25, BM25 + RM3 rewriting, dense MiniLM, hybrid RRF and the sentence reranker, the effect of chunk
size, FAISS against brute force, and one question answered with citations.
"""

from __future__ import annotations

import numpy as np

from nanomm.rag.evaluate import evaluate
from nanomm.rag.index import IndexConfig, RagIndex
from nanomm.rag.pipeline import ask
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 19
TITLE = "RAG"
MODES = ("bm25", "bm25+rm3", "dense", "hybrid", "rerank")
K = 5


TIE = 0.02  # nDCG differences this small are a question or two of the set: "about equal", not "better"


def _fmt(r: dict) -> str:
    return f"R@{K} {r['recall']:.2f}, MRR {r['mrr']:.2f}, nDCG@{K} {r['ndcg']:.2f}"


def _better(gain: float) -> str:
    """Verdict on a claim that one method is better, from its nDCG gain."""
    return "holds" if gain > 0 else ("approx" if gain >= -TIE else "wrong")


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(result))
    for i, (key, label) in enumerate((("recall", f"recall@{K}"), ("mrr", "MRR"), ("ndcg", f"nDCG@{K}"))):
        ax.bar(x + (i - 1) * 0.27, [r["all"][key] for r in result.values()], 0.27, label=label)
    ax.set_xticks(x, list(result))
    ax.set_ylim(0, 1)
    ax.set_title("retrieval on nanomm's docs/topics (labelled questions, EN + ZH)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ctx: TourContext) -> Chapter:
    from nanomm.rag.demo import demo_index

    ix, questions = demo_index(ctx.quick)
    result = evaluate(ix, questions, MODES, K)
    allq = {m: r["all"] for m, r in result.items()}
    n = allq["bm25"]["n"]
    claims: list[Claim] = []

    hybrid_gain = allq["hybrid"]["ndcg"] - max(allq["bm25"]["ndcg"], allq["dense"]["ndcg"])
    claims.append(Claim(
        "hybrid retrieval (BM25 + dense) is better than either alone", "混合检索：BM25 + 稠密，效果更好",
        f"hybrid {_fmt(allq['hybrid'])} vs BM25 {_fmt(allq['bm25'])}, dense {_fmt(allq['dense'])} ({n} questions)",
        _better(hybrid_gain), "Cormack et al. 2009 (RRF); measured by nanomm rag eval"))

    rm3_gain = allq["bm25+rm3"]["ndcg"] - allq["bm25"]["ndcg"]
    claims.append(Claim(
        "query rewriting improves retrieval", "Query Rewriting：重写问题提高检索质量",
        f"RM3 (no LLM): {_fmt(allq['bm25+rm3'])} vs BM25 {_fmt(allq['bm25'])}",
        _better(rm3_gain), "Abdul-Jaleel et al. 2004 (RM3)"))

    rerank_gain = allq["rerank"]["mrr"] - allq["hybrid"]["mrr"]
    claims.append(Claim(
        "reranking with a cross-encoder improves the order", "Reranking：用 Cross-Encoder 对检索结果重排序",
        f"no cross-encoder weights offline (nanomm's CrossEncoder loads them when given); its sentence max-sim "
        f"reranker: MRR {allq['hybrid']['mrr']:.2f} → {allq['rerank']['mrr']:.2f} ({rerank_gain:+.2f}) over hybrid",
        "unverifiable", "Nogueira & Cho 2019; a cross-encoder needs weights nanomm does not ship"))

    # Chunk granularity: BM25 alone (no encoder needed), the same pages cut at two sizes.
    files = sorted({c.source for c in ix.chunks})
    sizes = {}
    for size in (32, 128):
        small = RagIndex.build(files, IndexConfig(chunk_size=size, overlap=size // 5, encoder=None))
        sizes[size] = evaluate(small, questions, ["bm25"], K)["bm25"]["all"]
    claims.append(Claim(
        "chunk granularity changes retrieval quality", "Chunk 策略：文档切分粒度影响效果",
        f"BM25 with 32-token chunks {_fmt(sizes[32])}; with 128-token chunks {_fmt(sizes[128])}",
        "holds" if sizes[32] != sizes[128] else "wrong", "measured by nanomm (same pages, same questions)"))

    # FAISS: the notes' vector search; nanomm's flat index must return the brute-force top-k.
    q = ix.query_vector(questions[0].question)
    _, ids = ix.dense.search(q, K)
    brute = np.argsort(-(ix.dense.vectors @ q), kind="stable")[:K]
    claims.append(Claim(
        "FAISS returns the top-k most similar documents", "用 FAISS / Milvus 做向量检索，返回 top-k",
        f"FAISS ({ix.dense.kind}) top-{K} == brute-force top-{K}: {ids[0].tolist() == brute.tolist()}",
        "holds" if ids[0].tolist() == brute.tolist() else "wrong", "Johnson et al. 2017 (FAISS)"))

    question = "What is retrieval-augmented generation?"
    answer = ask(ix, question, k=3)
    lines = ["| mode | " + " | ".join(f"{m} ({g})" for g in ("all", "en", "zh") for m in (f"R@{K}", "MRR", f"nDCG@{K}")) + " |",
             "|---|" + "---|" * 9]
    for mode, r in result.items():
        cells = [f"{r[g][key]:.3f}" if g in r else "-" for g in ("all", "en", "zh") for key in ("recall", "mrr", "ndcg")]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", f"**Q:** {question}", "", "**A:** " + " ".join(answer.text.split()), ""]
    lines += [f"[{c['n']}] {c['source']}:{c['start']}-{c['end']} ({c['section']})" for c in answer.citations]
    path = ctx.plot_path("ch19_retrieval")
    _plot(result, path)
    demo = {f"{m} recall@{K}": r["recall"] for m, r in allq.items()} | {
        f"{m} MRR": r["mrr"] for m, r in allq.items()} | {"questions": float(n), "chunks": float(len(ix.chunks)),
                                                         "answer evidence": answer.evidence}
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[path])
