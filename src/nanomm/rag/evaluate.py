"""Retrieval evaluation against labelled spans: recall@k, MRR and nDCG@k, per search mode.

A question lists its relevant spans, {"source", "start", "end"} — or {"source", "anchor"}: a quoted
piece of the source whose offsets are found when the file is loaded, so the set survives edits to the
documents around it. A hit is relevant when its (source, start, end) overlaps a relevant span; sources
match when one path ends with the other ("docs/topics/19-rag.md" matches "/repo/docs/topics/19-rag.md").

  recall@k  share of the relevant spans overlapped by some hit in the top k
  MRR       1 / rank of the first relevant hit (0 if none in the top k), averaged
  nDCG@k    Σ_i g_i / log2(i + 1) over the top k, divided by its ideal; g_i = 1 when hit i overlaps a
            relevant span no earlier hit overlapped (overlapping chunks cannot earn one span twice)

Questions with no relevant span are the unanswerable ones: retrieval metrics skip them, and they
measure abstention instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nanomm.rag.store import read_jsonl
from nanomm.rag.text import language

__all__ = ["Question", "Span", "load_questions", "same_source", "metrics", "evaluate", "abstention", "default_questions",
           "default_corpus"]


@dataclass(frozen=True)
class Span:
    source: str
    start: int
    end: int


@dataclass
class Question:
    question: str
    relevant: list[Span] = field(default_factory=list)
    lang: str = "en"
    answer: str | None = None  # a short reference answer, when the set has one

    @property
    def answerable(self) -> bool:
        return bool(self.relevant)


def default_questions() -> Path:
    return Path(__file__).parent / "questions" / "docs_topics.jsonl"


def default_corpus() -> Path:
    """docs/topics of a source checkout (the default corpus); nanomm installed from a wheel has none."""
    return Path(__file__).resolve().parents[3] / "docs" / "topics"


def same_source(a: str, b: str) -> bool:
    pa, pb = Path(a).as_posix().split("/"), Path(b).as_posix().split("/")
    n = min(len(pa), len(pb))
    return pa[-n:] == pb[-n:]


def _find_anchor(text: str, anchor: str) -> tuple[int, int] | None:
    at = text.find(anchor)
    if at >= 0:
        return at, at + len(anchor)
    # tolerate re-wrapped lines: any run of whitespace matches any other
    words = anchor.split()
    if not words:
        return None
    m = re.search(r"\s+".join(map(re.escape, words)), text)
    return m.span() if m else None


def _read_source(source: str, roots: Sequence[Path]) -> str | None:
    for root in [Path("."), *roots]:
        p = root / source
        if p.is_file():
            return p.read_text(encoding="utf-8")
    return None


def load_questions(path: "str | Path", roots: Sequence["str | Path"] = ()) -> tuple[list[Question], list[str]]:
    """Questions of a JSONL file, anchors resolved against files found under ``roots``; and the problems met
    (a relevant span whose file or anchor is missing drops its question, with a message, instead of failing)."""
    roots = [Path(r) for r in roots] + [default_corpus().parents[1]]
    texts: dict[str, str | None] = {}
    questions, problems = [], []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("relevant", []), list):
            raise ValueError(f"{path}: line {n}: expected {{'question': str, 'relevant': [...]}}, got keys {sorted(row)}")
        spans, ok = [], True
        for rel in row.get("relevant", []):
            if "start" in rel and "end" in rel:
                spans.append(Span(rel["source"], int(rel["start"]), int(rel["end"])))
                continue
            if rel["source"] not in texts:
                texts[rel["source"]] = _read_source(rel["source"], roots)
            text = texts[rel["source"]]
            found = _find_anchor(text, rel["anchor"]) if text is not None else None
            if found is None:
                problems.append(f"line {n}: {'file' if text is None else 'anchor'} not found: {rel['source']}"
                                + ("" if text is None else f" {rel['anchor'][:40]!r}"))
                ok = False
                break
            spans.append(Span(rel["source"], *found))
        if ok:
            questions.append(Question(row["question"], spans, row.get("lang") or language(row["question"]),
                                      row.get("answer")))
    return questions, problems


def _overlaps(hit, span: Span) -> bool:
    return hit.chunk.start < span.end and span.start < hit.chunk.end and same_source(hit.chunk.source, span.source)


def metrics(hits: Sequence, relevant: Sequence[Span], k: int) -> dict[str, float]:
    """recall@k, MRR@k (reciprocal rank) and nDCG@k of one ranked list."""
    hits = list(hits)[:k]
    credited: set[int] = set()
    dcg, first = 0.0, 0
    for i, h in enumerate(hits, 1):
        matched = {j for j, s in enumerate(relevant) if _overlaps(h, s)}
        if matched and not first:
            first = i
        if matched - credited:
            dcg += 1.0 / math.log2(i + 1)
            credited |= matched
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(k, len(relevant)) + 1))
    return {"recall": len(credited) / len(relevant), "mrr": 1.0 / first if first else 0.0,
            "ndcg": dcg / ideal if ideal else 0.0}


def evaluate(index, questions: Sequence[Question], modes: Sequence[str], k: int = 5) -> dict:
    """{mode: {"all"|lang: {recall, mrr, ndcg, n}}} over the answerable questions."""
    answerable = [q for q in questions if q.answerable]
    out: dict = {}
    for mode in modes:
        per: dict[str, list[dict]] = {}
        for q in answerable:
            m = metrics(index.search(q.question, k, mode), q.relevant, k)
            per.setdefault("all", []).append(m)
            per.setdefault(q.lang, []).append(m)
        out[mode] = {group: {key: sum(r[key] for r in rows) / len(rows) for key in ("recall", "mrr", "ndcg")} | {"n": len(rows)}
                     for group, rows in per.items()}
    return out


def abstention(index, questions: Sequence[Question], *, k: int = 5, mode: str | None = None,
               threshold: float | None = None) -> dict:
    """Evidence of answerable vs unanswerable questions, per language: the rates at the thresholds in use
    (``threshold`` for every language, or grounding.THRESHOLDS) and the best threshold of each language."""
    from nanomm.rag.grounding import calibrate, evidence, threshold_for

    mode = mode or ("rerank" if index.dense is not None else "bm25")
    kind = "cosine+lexical" if index.sentences.vectors is not None and index.dense is not None else "lexical"
    scores: dict[str, dict[bool, list[float]]] = {}
    for q in questions:
        s, kind = evidence(index, q.question, index.search(q.question, k, mode))
        scores.setdefault(q.lang, {True: [], False: []})[q.answerable].append(s)
    report: dict = {"evidence": kind, "mode": mode, "languages": {}}
    totals = {True: [0, 0], False: [0, 0]}  # answerable: [answered, n]; unanswerable: [abstained, n]
    for lang, by in sorted(scores.items()):
        t = threshold if threshold is not None else threshold_for(kind, lang)
        a, u = by[True], by[False]
        row: dict = {"threshold": t, "n_answerable": len(a), "n_unanswerable": len(u)}
        if a:
            row["answered_when_answerable"] = sum(s >= t for s in a) / len(a)
        if u:
            row["abstained_when_unanswerable"] = sum(s < t for s in u) / len(u)
        if a and u:
            row["best"] = calibrate(a, u)
        totals[True][0] += sum(s >= t for s in a)
        totals[True][1] += len(a)
        totals[False][0] += sum(s < t for s in u)
        totals[False][1] += len(u)
        report["languages"][lang] = row
    report["n_answerable"], report["n_unanswerable"] = totals[True][1], totals[False][1]
    if totals[True][1]:
        report["answered_when_answerable"] = totals[True][0] / totals[True][1]
    if totals[False][1]:
        report["abstained_when_unanswerable"] = totals[False][0] / totals[False][1]
    return report
