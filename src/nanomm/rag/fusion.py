"""Hybrid retrieval: merge the ranked lists of several retrievers into one.

Reciprocal-rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009), with a weight per retriever:

  RRF(d) = Σ_r w_r / (k + rank_r(d)),   rank from 1, k = 60;  a list that misses d adds nothing

Only ranks matter, so BM25's unbounded scores and cosine similarities in [-1, 1] mix without tuning.
Score fusion keeps the margins instead: normalise each retriever's scores over its own list, then

  S(d) = Σ_r w_r · norm_r(s_r(d)),   norm from NORMALISERS (min-max to [0, 1], or z-score)

a document missing from a list gets that list's minimum normalised score (min-max: 0). Ties are broken
by the lower document id, so fusion is deterministic.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["rrf", "score_fusion", "NORMALISERS", "FUSIONS", "fuse"]

Ranked = Sequence[tuple[int, float]]  # (doc id, score), best first


def _check(runs: Mapping[str, Ranked], weights: Mapping[str, float] | None) -> dict[str, float]:
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs: expected a non-empty {retriever name: [(doc id, score), ...]} mapping")
    weights = dict(weights or {})
    unknown = set(weights) - set(runs)
    if unknown:
        raise ValueError(f"weights: expected keys among the retrievers {sorted(runs)}, got unknown {sorted(unknown)}")
    w = {name: float(weights.get(name, 1.0)) for name in runs}
    if any(v < 0 for v in w.values()):
        raise ValueError(f"weights: expected non-negative weights, got {w}")
    return w


def _sorted(scores: dict[int, float], k: int | None) -> list[tuple[int, float]]:
    out = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return out[:k] if k is not None else out


def rrf(runs: Mapping[str, Ranked], weights: Mapping[str, float] | None = None, *, k_rrf: int = 60,
        k: int | None = None) -> list[tuple[int, float]]:
    """Weighted reciprocal-rank fusion of ranked lists; returns (doc id, fused score), best first."""
    if isinstance(k_rrf, bool) or not isinstance(k_rrf, int) or k_rrf < 0:
        raise ValueError(f"k_rrf: expected an int >= 0, got {k_rrf!r}")
    w = _check(runs, weights)
    fused: dict[int, float] = {}
    for name, run in runs.items():
        for rank, (doc, _) in enumerate(run, 1):
            fused[doc] = fused.get(doc, 0.0) + w[name] / (k_rrf + rank)
    return _sorted(fused, k)


def _minmax(s: np.ndarray) -> np.ndarray:
    span = s.max() - s.min()
    return np.ones_like(s) if span == 0 else (s - s.min()) / span


def _zscore(s: np.ndarray) -> np.ndarray:
    sd = s.std()
    return np.zeros_like(s) if sd == 0 else (s - s.mean()) / sd


NORMALISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"minmax": _minmax, "zscore": _zscore}


def score_fusion(runs: Mapping[str, Ranked], weights: Mapping[str, float] | None = None, *, norm: str = "minmax",
                 k: int | None = None) -> list[tuple[int, float]]:
    """Weighted sum of per-retriever normalised scores (a convex combination when the weights sum to 1)."""
    if norm not in NORMALISERS:
        raise ValueError(f"norm: expected one of {sorted(NORMALISERS)}, got {norm!r}")
    w = _check(runs, weights)
    normed: dict[str, dict[int, float]] = {}
    floor: dict[str, float] = {}
    for name, run in runs.items():
        if not run:
            normed[name], floor[name] = {}, 0.0
            continue
        s = NORMALISERS[norm](np.asarray([sc for _, sc in run], np.float64))
        normed[name] = {doc: float(v) for (doc, _), v in zip(run, s)}
        floor[name] = float(s.min())
    docs = {doc for run in normed.values() for doc in run}
    fused = {d: sum(w[n] * normed[n].get(d, floor[n]) for n in runs) for d in docs}
    return _sorted(fused, k)


FUSIONS: dict[str, Callable[..., list[tuple[int, float]]]] = {"rrf": rrf, "score": score_fusion}


def fuse(runs: Mapping[str, Ranked], method: str = "rrf", weights: Mapping[str, float] | None = None,
         k: int | None = None) -> list[tuple[int, float]]:
    if method not in FUSIONS:
        raise ValueError(f"method: expected one of {sorted(FUSIONS)}, got {method!r}")
    return FUSIONS[method](runs, weights, k=k)
