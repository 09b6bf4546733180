"""Ask a question of an index: retrieve, decide whether the evidence suffices, generate, vote, check.

  question ─(rewrite: none | rm3 | multi)→ search → evidence ≥ threshold ? → generator × k samples
           → self-consistency vote → grounding check → Answer (text, citations, confidence, flags)

"rm3" rewrites with pseudo-relevance feedback (BM25 only); "multi" asks the generator's LLM for
paraphrases and fuses their results by RRF (needs an LLM generator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nanomm.rag.fusion import rrf
from nanomm.rag.generate import ABSTAIN, ExtractiveGenerator
from nanomm.rag.grounding import SentenceCheck, check_grounding, evidence, threshold_for, vote
from nanomm.rag.index import Hit, RagIndex
from nanomm.rag.rewrite import multi_query_prompt, parse_queries
from nanomm.rag.text import language

__all__ = ["Answer", "ask", "retrieve", "REWRITES"]

REWRITES = ("none", "rm3", "multi")
_CITED = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class Answer:
    question: str
    text: str
    abstained: bool
    evidence: float  # strength of the best evidence (see grounding.evidence)
    evidence_kind: str  # "cosine+lexical" | "lexical" (grounding.THRESHOLDS)
    threshold: float
    confidence: float  # self-consistency agreement (1.0 for a single sample)
    hits: list[Hit] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    checks: list[SentenceCheck] = field(default_factory=list)

    @property
    def citations(self) -> list[dict]:
        """The hits the answer cites, as {n, source, start, end, section}."""
        cited = sorted({int(n) for m in _CITED.findall(self.text) for n in m.split(",")})
        return [{"n": n, "source": self.hits[n - 1].chunk.source, "start": self.hits[n - 1].chunk.start,
                 "end": self.hits[n - 1].chunk.end, "section": self.hits[n - 1].chunk.section}
                for n in cited if 1 <= n <= len(self.hits)]

    @property
    def flagged(self) -> list[SentenceCheck]:
        return [c for c in self.checks if c.flagged]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "abstained": self.abstained,
                "evidence": self.evidence, "evidence_kind": self.evidence_kind, "threshold": self.threshold,
                "confidence": self.confidence, "citations": self.citations, "samples": self.samples,
                "flagged": [c.__dict__ for c in self.flagged], "hits": [h.to_dict() for h in self.hits]}


def retrieve(index: RagIndex, question: str, *, k: int = 5, mode: str | None = None, rewrite: str = "none",
             generator=None) -> list[Hit]:
    if rewrite not in REWRITES:
        raise ValueError(f"rewrite: expected one of {REWRITES}, got {rewrite!r}")
    mode = mode or ("rerank" if index.dense is not None else "bm25")
    if rewrite == "rm3":
        return index.search(question, k, "bm25+rm3")
    if rewrite == "multi":
        if not hasattr(generator, "complete"):
            raise ValueError("rewrite: 'multi' needs an LLM generator (local or openai), not the extractive one")
        text = generator.complete(multi_query_prompt(question), n=1, temperature=0.0)[0]
        runs = {f"q{i}": [(h.chunk.id, h.score) for h in index.search(q, max(k, 20), mode)]
                for i, q in enumerate(parse_queries(text, question))}
        return [Hit(index.chunks[d], s, r) for r, (d, s) in enumerate(rrf(runs, k=k), 1)]
    return index.search(question, k, mode)


def ask(index: RagIndex, question: str, *, k: int = 5, mode: str | None = None, generator=None,
        samples: int = 1, temperature: float | None = None, threshold: float | None = None, rewrite: str = "none",
        min_support: float = 0.6, seed: int = 0) -> Answer:
    """Answer ``question`` from ``index``; abstain when the evidence is below ``threshold``. ``temperature``
    defaults to the generator's own (LLMs 0.7; the extractive one samples over scores in [0, 1]: 0.05)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    generator = generator or ExtractiveGenerator()
    if temperature is None:
        temperature = getattr(generator, "default_temperature", 0.7)
    hits = retrieve(index, question, k=k, mode=mode, rewrite=rewrite, generator=generator)
    strength, kind = evidence(index, question, hits)
    lang = language(question)
    if threshold is None:
        threshold = threshold_for(kind, lang)
    if strength < threshold:
        return Answer(question, ABSTAIN[lang], True, strength, kind, threshold, 1.0, hits)
    if samples == 1:
        outs = generator.answer(question, hits, index, n=1, temperature=0.0, seed=seed)
        text, agreement = outs[0], 1.0
    else:
        outs = generator.answer(question, hits, index, n=samples, temperature=temperature, seed=seed)
        text, agreement, _ = vote(outs, index.bm25.analyzer)
    abstained = text.strip().rstrip(".。").lower() in {a.rstrip(".。").lower() for a in ABSTAIN.values()}
    checks = [] if abstained else check_grounding(text, hits, index.bm25.analyzer, min_support=min_support)
    return Answer(question, text, abstained, strength, kind, threshold, agreement, hits, list(outs), checks)


def format_answer(answer: Answer) -> str:
    """Plain text for a terminal: the answer, then the numbered sources it cites."""
    lines = [answer.text, ""]
    for c in answer.citations:
        lines.append(f"[{c['n']}] {c['source']}:{c['start']}-{c['end']}" + (f" ({c['section']})" if c["section"] else ""))
    tail = f"evidence {answer.evidence:.3f} ({answer.evidence_kind}, threshold {answer.threshold:.2f})"
    if len(answer.samples) > 1:
        tail += f", agreement {answer.confidence:.2f} over {len(answer.samples)} samples"
    lines.append(tail)
    for c in answer.flagged:
        why = f"numbers {', '.join(c.missing_numbers)} in no source" if c.missing_numbers else f"support {c.support:.2f}"
        lines.append(f"unsupported: {c.sentence!r} ({why})")
    return "\n".join(lines)
