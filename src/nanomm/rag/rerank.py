"""Second-stage reranking of the first stage's candidates.

A cross-encoder reads query and passage together ([CLS] q [SEP] p [SEP] → BERT → linear → relevance;
Nogueira & Cho, "Passage Re-ranking with BERT", 2019) and is the usual reranker. No cross-encoder
weights ship offline with nanomm, so the default reranker is a finer bi-encoder instead:

  sentence max-sim   r(q, d) = α · max_{s ∈ d} cos(e(q), e(s)) + (1 − α) · minmax(first-stage score)(d)

— the chunk's best *sentence* against the query (MiniLM embeds sentences; a whole chunk's mean-pooled
vector blurs its facts, and chunks past 256 word pieces are truncated), blended with the fused
BM25 + dense score so that lexical matches keep their say. Whether it helps is measured by
``nanomm rag eval`` (mode "rerank" against "hybrid"). ``CrossEncoderReranker`` wraps any scorer with the
cross-encoder interface — (query, passages) -> scores — for when such weights are available.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from nanomm.rag.fusion import NORMALISERS
from nanomm.rag.sentences import SentenceStore

__all__ = ["MaxSimReranker", "CrossEncoderReranker"]


class MaxSimReranker:
    name = "sentence-maxsim"

    def __init__(self, alpha: float = 0.5):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
        self.alpha = alpha

    def rerank(self, query_vec: np.ndarray, candidates: Sequence[tuple[int, float]],
               sentences: SentenceStore) -> list[tuple[int, float]]:
        if not candidates:
            return []
        ids = [d for d, _ in candidates]
        first = NORMALISERS["minmax"](np.asarray([s for _, s in candidates], np.float64))
        best = sentences.max_sim(query_vec, sorted(ids))
        scored = {d: self.alpha * best.get(d, (0.0, -1))[0] + (1 - self.alpha) * f for d, f in zip(ids, first)}
        return sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))


class CrossEncoderReranker:
    """Rerank by a joint (query, passage) scorer: a cross-encoder's ``predict(pairs) -> scores``."""

    name = "cross-encoder"

    def __init__(self, score_pairs: Callable[[list[tuple[str, str]]], np.ndarray]):
        if not callable(score_pairs):
            raise TypeError(f"score_pairs: expected a callable (pairs) -> scores, got {type(score_pairs).__name__}")
        self.score_pairs = score_pairs

    def rerank_texts(self, query: str, candidates: Sequence[tuple[int, float]], texts: Sequence[str]) -> list[tuple[int, float]]:
        if not candidates:
            return []
        scores = np.asarray(self.score_pairs([(query, t) for t in texts]), np.float64).reshape(-1)
        if scores.shape[0] != len(candidates):
            raise ValueError(f"score_pairs: expected {len(candidates)} scores, got {scores.shape[0]}")
        return sorted(((d, float(s)) for (d, _), s in zip(candidates, scores)), key=lambda kv: (-kv[1], kv[0]))
