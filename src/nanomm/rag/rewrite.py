"""Query rewriting: pseudo-relevance feedback (RM3) with no model, and multi-query with an LLM.

RM3 (Abdul-Jaleel et al., UMass at TREC 2004; relevance models of Lavrenko & Croft, SIGIR 2001)
assumes the top documents of a first search are relevant and learns from them which words the query
forgot:

  P(w | R) ∝ Σ_{d ∈ top m} P(w | d) · P(q | d),   P(w | d) = tf(w, d) / |d|,  P(q | d) ∝ score(q, d)
  q'(w)    = λ · P(w | q) + (1 − λ) · P̂(w | R)    P̂: the n heaviest feedback terms, renormalised

and searches again with the weighted query q'. It helps when the first page is on topic (most terms of
the feedback documents are), and it can drift when it is not. Anserini's defaults: m = 10, n = 10,
λ = 0.5.

Multi-query: an LLM writes paraphrases of the question; each is searched and the lists are fused by
RRF. It needs a generator; without one the question alone is searched.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

__all__ = ["rm3", "multi_query_prompt", "parse_queries"]


def rm3(query_terms: Sequence[str], feedback: Sequence[tuple[Sequence[str], float]], *, n_terms: int = 10,
        lam: float = 0.5) -> dict[str, float]:
    """The RM3 query {term: weight} (weights sum to 1) from the query's terms and (doc terms, score) pairs."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a number in [0, 1], got {lam!r}")
    if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 0:
        raise ValueError(f"n_terms: expected an int >= 0, got {n_terms!r}")
    q = Counter(query_terms)
    original = {t: c / sum(q.values()) for t, c in q.items()} if q else {}
    total = sum(max(s, 0.0) for _, s in feedback)
    relevance: Counter = Counter()
    if total > 0:
        for terms, score in feedback:
            if score <= 0 or not terms:
                continue
            tf = Counter(terms)
            for w, c in tf.items():
                relevance[w] += (c / len(terms)) * (score / total)  # P(w|d) · P(q|d)
    top = sorted(relevance.items(), key=lambda kv: (-kv[1], kv[0]))[:n_terms]
    z = sum(v for _, v in top)
    expansion = {w: v / z for w, v in top} if z > 0 else {}
    if not expansion:
        return original
    if not original:
        return expansion
    out: dict[str, float] = {}
    for w, v in original.items():
        out[w] = out.get(w, 0.0) + lam * v
    for w, v in expansion.items():
        out[w] = out.get(w, 0.0) + (1.0 - lam) * v
    return {w: v for w, v in out.items() if v > 0}


def multi_query_prompt(question: str, n: int = 3) -> str:
    return (f"Write {n} different search queries that would find documents answering the question below. "
            f"Use other words than the question. One query per line, no numbering.\n\nQuestion: {question}\nQueries:\n")


_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)、]|q\d*[:.])\s*", re.IGNORECASE)


def parse_queries(text: str, question: str, n: int = 3) -> list[str]:
    """The original question, then up to n distinct rewritten queries, one per line of the LLM's answer."""
    out = [question]
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"')
        if line and line.lower() not in {q.lower() for q in out}:
            out.append(line)
        if len(out) == n + 1:
            break
    return out
