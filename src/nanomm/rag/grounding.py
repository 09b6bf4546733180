"""Hallucination control around generation: abstain, vote, and check every answer sentence.

Abstention. Before generating, measure how strong the retrieved evidence is,

  evidence(q) = max over the top-k chunks c of ½ · max_{s ∈ c} cos(e(q), e(s)) + ½ · coverage(q, c)

cos: MiniLM vectors of the question and of each sentence; coverage: the share of the question's idf
mass whose terms occur in the chunk (BM25.coverage). Either alone fails somewhere: MiniLM was trained
on English, and two unrelated Chinese sentences can reach cos 0.45; words alone miss paraphrases.
Below a threshold the answer is "I don't know" / "我不知道". The thresholds (``THRESHOLDS``, per
measure and per question language) were chosen on the question set shipped with nanomm (questions
answered in docs/topics, and questions answered by no document): ``calibrate`` picks the threshold of
best balanced accuracy, and ``nanomm rag eval`` reports the rates. They differ by language because the
evidence does: English MiniLM and English pages give a Chinese question lower scores whether or not the
pages answer it. An index without vectors uses coverage alone, with thresholds of its own.

Self-consistency (Wang et al., 2023): sample k answers at temperature > 0, group answers that say the
same thing (Jaccard similarity of their analysed terms >= 0.6, citations ignored), return the largest
group's first answer; agreement = its share of the k samples, a confidence.

Grounding check: each answer sentence must be supported by a retrieved chunk — by the chunks it cites
if it cites any, else by any: support = the share of the sentence's terms present in the chunk, and
every number in the sentence must appear in that chunk (a wrong year is the classic factual
hallucination: the notes' "relativity in 1921"). A sentence below ``min_support`` or with a number no
source has is flagged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from nanomm.rag.chunking import text_units
from nanomm.rag.generate import ABSTAIN, strip_citations

__all__ = ["THRESHOLDS", "threshold_for", "evidence", "calibrate", "vote", "check_grounding", "SentenceCheck"]

# measure -> question language -> threshold. Measured on nanomm's question set over 14 pages of docs/topics
# (52 + 26 answerable, 15 + 9 unanswerable questions in English + Chinese), chosen on that same set (no
# held-out split: expect somewhat lower abstention on new questions). cosine+lexical: en 0.47 answers 94%
# and abstains on 100% (0.45: 98% / 80%), zh 0.30 answers 73% and abstains on 100% (0.28: 85% / 89%).
# lexical alone: best balanced accuracy at 0.48 (en: 94% / 87%) and 0.16 (zh: 92% / 78%).
THRESHOLDS: dict[str, dict[str, float]] = {
    "cosine+lexical": {"en": 0.47, "zh": 0.30},
    "lexical": {"en": 0.50, "zh": 0.20},
}


def threshold_for(kind: str, lang: str) -> float:
    """The abstention threshold of an evidence measure for a question language ('en' for any other)."""
    if kind not in THRESHOLDS:
        raise ValueError(f"kind: expected one of {sorted(THRESHOLDS)}, got {kind!r}")
    return THRESHOLDS[kind].get(lang, THRESHOLDS[kind]["en"])

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# "… the end. [2] Next …": a citation after the full stop belongs to the sentence before it
_TRAILING_CITATION = re.compile(r"([.!?。！？；])(\s*)((?:\[\d+(?:\s*,\s*\d+)*\]\s*)+)")
_CITED = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def evidence(index, question: str, hits: Sequence) -> tuple[float, str]:
    """(strength of the best evidence among the hits, which measure): a key of THRESHOLDS; 0 without hits."""
    store = index.sentences
    dense = store.vectors is not None and index.dense is not None
    kind = "cosine+lexical" if dense else "lexical"
    if not hits:
        return 0.0, kind
    q_terms = index.bm25.analyzer(question)
    cover = {h.chunk.id: index.bm25.coverage(q_terms, h.chunk.text) for h in hits}
    if not dense:
        return max(cover.values()), kind
    best = store.max_sim(index.query_vector(question), sorted(cover))
    return max(0.5 * best.get(c, (0.0, -1))[0] + 0.5 * v for c, v in cover.items()), kind


def calibrate(answerable: Sequence[float], unanswerable: Sequence[float]) -> dict[str, float]:
    """The threshold t (answer iff evidence >= t) maximising balanced accuracy, and the rates it gives."""
    a, u = np.asarray(answerable, np.float64), np.asarray(unanswerable, np.float64)
    if a.size == 0 or u.size == 0:
        raise ValueError(f"answerable, unanswerable: expected both non-empty, got {a.size} and {u.size} scores")
    cands = np.unique(np.concatenate([a, u]))
    mids = np.concatenate([[cands[0] - 1e-6], (cands[:-1] + cands[1:]) / 2, [cands[-1] + 1e-6]])
    best = max(mids, key=lambda t: ((a >= t).mean() + (u < t).mean(), -abs(t - 0.5)))
    return {"threshold": float(best), "answered_when_answerable": float((a >= best).mean()),
            "abstained_when_unanswerable": float((u < best).mean()),
            "balanced_accuracy": float(((a >= best).mean() + (u < best).mean()) / 2)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def vote(samples: Sequence[str], analyzer, *, similar: float = 0.6) -> tuple[str, float, list[int]]:
    """(majority answer, agreement in [0, 1], group id of each sample) over k sampled answers."""
    if not samples:
        raise ValueError("samples: expected at least one answer")
    terms = [set(analyzer(strip_citations(s))) for s in samples]
    groups: list[list[int]] = []
    label = []
    for i, t in enumerate(terms):
        for g, members in enumerate(groups):
            if _jaccard(t, terms[members[0]]) >= similar:
                members.append(i)
                label.append(g)
                break
        else:
            groups.append([i])
            label.append(len(groups) - 1)
    biggest = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
    return samples[groups[biggest][0]], len(groups[biggest]) / len(samples), label


@dataclass
class SentenceCheck:
    sentence: str
    support: float  # share of the sentence's terms found in its best supporting chunk
    source: int | None  # citation number (1-based position in the hits) of that chunk
    missing_numbers: list[str] = field(default_factory=list)
    flagged: bool = False


def check_grounding(answer: str, hits: Sequence, analyzer, *, min_support: float = 0.6) -> list[SentenceCheck]:
    """One check per answer sentence; abstentions are not checked (they claim nothing)."""
    if not 0.0 <= min_support <= 1.0:
        raise ValueError(f"min_support: expected a number in [0, 1], got {min_support!r}")
    answer = _TRAILING_CITATION.sub(lambda m: " " + m.group(3).strip() + m.group(1) + m.group(2), answer)
    chunk_terms = [set(analyzer(h.chunk.text)) for h in hits]
    chunk_numbers = [set(_NUMBER.findall(h.chunk.text)) for h in hits]
    out = []
    for s, e in text_units(answer):
        raw = answer[s:e]
        sentence = strip_citations(raw)
        if not sentence or sentence in ABSTAIN.values():
            continue
        cited = {int(n) for m in _CITED.findall(raw) for n in m.split(",")}
        pool = [n - 1 for n in sorted(cited) if 1 <= n <= len(hits)] or list(range(len(hits)))
        terms = set(analyzer(sentence))
        numbers = set(_NUMBER.findall(sentence))
        best, best_support, best_missing = None, 0.0, sorted(numbers)
        for j in pool:
            support = len(terms & chunk_terms[j]) / len(terms) if terms else 1.0
            missing = sorted(numbers - chunk_numbers[j])
            if best is None or (len(missing), -support) < (len(best_missing), -best_support):
                best, best_support, best_missing = j, support, missing
        flagged = best is None or best_support < min_support or bool(best_missing)
        out.append(SentenceCheck(sentence, best_support, None if best is None else best + 1, best_missing, flagged))
    return out
