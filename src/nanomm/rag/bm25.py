"""Okapi BM25 as a sparse term x document matrix of precomputed weights.

  score(q, d) = Σ_{t ∈ q} w_q(t) · idf(t) · s · tf(t, d) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl))

tf saturates (k1 bounds how much repeating a term helps) and is normalised by document length (b = 1:
fully, b = 0: not at all). Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond" (2009). Variants differ in idf and in the constant s (Kamphuis et al., "Which BM25 Do You
Mean?", ECIR 2020), chosen from ``VARIANTS``:

  robertson  idf = log((N − df + 0.5) / (df + 0.5)), floored at 0 (it is negative for df > N/2); s = 1
  lucene     idf = log(1 + (N − df + 0.5) / (df + 0.5)), always > 0;                           s = 1
  atire      idf = log(N / df);                                                                s = k1 + 1

s scales every score alike and never changes a ranking; the classic formula has s = k1 + 1.

Because only tf depends on the pair (t, d), every weight idf · s · tf / (tf + k1 · norm(d)) is computed
once at index time ("eager" scoring, as bm25s does) and stored as a CSR matrix with one row per term.
A query then only adds the rows of its terms: O(Σ df(t)) work per query, no pass over the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nanomm.rag.analysis import Analyzer, make_analyzer
from nanomm.rag.store import load_arrays, read_json, save_arrays, write_json

__all__ = ["BM25", "VARIANTS", "Variant", "top_k"]


@dataclass(frozen=True)
class Variant:
    idf: Callable[[np.ndarray, int], np.ndarray]  # (df, N) -> idf, float64
    scale: Callable[[float], float]  # k1 -> s


VARIANTS: dict[str, Variant] = {
    "robertson": Variant(lambda df, n: np.log(np.maximum(1.0, (n - df + 0.5) / (df + 0.5))), lambda k1: 1.0),
    "lucene": Variant(lambda df, n: np.log1p((n - df + 0.5) / (df + 0.5)), lambda k1: 1.0),
    "atire": Variant(lambda df, n: np.log(n / df), lambda k1: k1 + 1.0),
}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; ties go to the lower index. O(n + k log k)."""
    n = scores.shape[0]
    if k >= n:
        cand = np.arange(n)
    else:
        cand = np.argpartition(-scores, k - 1)[:k]  # unordered top k in linear time
        kth = scores[cand].min()
        if np.count_nonzero(scores == kth) > 1:
            # argpartition picks arbitrarily among scores equal to the k-th: keep the lowest indices
            above = np.flatnonzero(scores > kth)
            cand = np.concatenate([above, np.flatnonzero(scores == kth)[: k - above.shape[0]]])
    order = np.lexsort((cand, -scores[cand]))
    return cand[order][:k]


class BM25:
    """A BM25 index. Build with :meth:`index` (texts, analysed) or :meth:`index_tokens` (already tokenised)."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, variant: str = "lucene",
                 analyzer: "str | dict | Analyzer | None" = None):
        if not (isinstance(k1, (int, float)) and k1 >= 0):
            raise ValueError(f"k1: expected a number >= 0, got {k1!r}")
        if not (isinstance(b, (int, float)) and 0 <= b <= 1):
            raise ValueError(f"b: expected a number in [0, 1], got {b!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
        self.k1, self.b, self.variant = float(k1), float(b), variant
        self.analyzer = make_analyzer(analyzer)
        self.vocab: dict[str, int] = {}
        self.indptr = np.zeros(1, np.int64)  # CSR by term: row t is indices/data[indptr[t]:indptr[t+1]]
        self.indices = np.zeros(0, np.int32)  # document ids
        self.data = np.zeros(0, np.float32)  # precomputed term weights
        self.doc_len = np.zeros(0, np.int32)
        self.idf = np.zeros(0, np.float32)

    @property
    def n_docs(self) -> int:
        return int(self.doc_len.shape[0])

    # ---- building ----------------------------------------------------------------------------------

    def index(self, texts: Sequence[str]) -> "BM25":
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a sequence of str")
        return self.index_tokens([self.analyzer(t) for t in texts])

    def index_tokens(self, corpus: Sequence[Sequence[str]]) -> "BM25":
        if isinstance(corpus, str) or len(corpus) == 0:
            raise ValueError(f"corpus: expected a non-empty sequence of token lists, got {type(corpus).__name__} of length {len(corpus) if not isinstance(corpus, str) else 'str'}")
        vocab: dict[str, int] = {}
        get = vocab.setdefault
        ids = [get(tok, len(vocab)) for doc in corpus for tok in doc]
        lens = np.fromiter((len(doc) for doc in corpus), np.int64, len(corpus))
        self.vocab = vocab
        self._fit(np.asarray(ids, np.int64), lens)
        return self

    def _fit(self, term_ids: np.ndarray, doc_len: np.ndarray) -> None:
        n_docs, n_terms = doc_len.shape[0], len(self.vocab)
        doc_ids = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
        # One key per (term, doc) pair; sorting keys sorts by term then doc: the CSR order.
        keys, tf = np.unique(term_ids * n_docs + doc_ids, return_counts=True)
        rows, cols = np.divmod(keys, n_docs)
        df = np.bincount(rows, minlength=n_terms)
        avgdl = float(doc_len.mean()) if doc_len.sum() else 1.0
        variant = VARIANTS[self.variant]
        idf = variant.idf(df.astype(np.float64), n_docs)
        norm = self.k1 * (1.0 - self.b + self.b * doc_len / avgdl)  # (D,)
        tf = tf.astype(np.float64)
        self.data = (idf[rows] * variant.scale(self.k1) * tf / (tf + norm[cols])).astype(np.float32)
        self.indices = cols.astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        self.doc_len = doc_len.astype(np.int32)
        self.idf = idf.astype(np.float32)

    # ---- querying ----------------------------------------------------------------------------------

    def query_weights(self, query: "str | Sequence[str] | Mapping[str, float]") -> tuple[np.ndarray, np.ndarray]:
        """(term ids, weights) of a query: analysed text, a token list (repeats count), or {term: weight}."""
        if isinstance(query, str):
            query = self.analyzer(query)
        if isinstance(query, Mapping):
            items = [(self.vocab[t], float(w)) for t, w in query.items() if t in self.vocab]
        elif isinstance(query, Sequence):
            counts: dict[int, float] = {}
            for t in query:
                if not isinstance(t, str):
                    raise TypeError(f"query: expected str tokens, got {type(t).__name__}")
                if t in self.vocab:
                    counts[self.vocab[t]] = counts.get(self.vocab[t], 0.0) + 1.0
            items = list(counts.items())
        else:
            raise TypeError(f"query: expected str, a token list or a {{term: weight}} dict, got {type(query).__name__}")
        if not items:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        t, w = zip(*items)
        return np.asarray(t, np.int64), np.asarray(w, np.float32)

    def get_scores(self, query: "str | Sequence[str] | Mapping[str, float]") -> np.ndarray:
        """BM25 score of every document, (N,) float32."""
        terms, weights = self.query_weights(query)
        scores = np.zeros(self.n_docs, np.float32)
        indptr, indices, data = self.indptr, self.indices, self.data
        for t, w in zip(terms.tolist(), weights.tolist()):
            s, e = indptr[t], indptr[t + 1]
            # documents are unique within a row, so fancy-index += is exact (no lost duplicates)
            if w == 1.0:
                scores[indices[s:e]] += data[s:e]
            else:
                scores[indices[s:e]] += np.float32(w) * data[s:e]
        return scores

    def search(self, query, k: int = 10) -> list[tuple[int, float]]:
        """The k best (doc id, score), best first; documents sharing no term with the query are left out."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        scores = self.get_scores(query)
        best = top_k(scores, k)
        return [(int(i), float(scores[i])) for i in best if scores[i] > 0]

    def coverage(self, query: "str | Sequence[str]", text: "str | Sequence[str]") -> float:
        """Share of the query's idf mass whose terms occur in ``text``: 1 when every query term is there.
        Terms the corpus never saw weigh as much as its rarest term (a question about something absent
        must not be covered by its common words alone)."""
        q = set(self.analyzer(query) if isinstance(query, str) else query)
        t = set(self.analyzer(text) if isinstance(text, str) else text)
        if not q:
            return 0.0
        unseen = float(self.idf.max()) if self.idf.size else 1.0
        w = {term: float(self.idf[self.vocab[term]]) if term in self.vocab else unseen for term in q}
        total = sum(w.values())
        return sum(v for term, v in w.items() if term in t) / total if total > 0 else 0.0

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, folder: "str | Path") -> None:
        folder = Path(folder)
        save_arrays(folder / "bm25.safetensors", {"indptr": self.indptr, "indices": self.indices,
                                                  "data": self.data, "doc_len": self.doc_len, "idf": self.idf})
        vocab = sorted(self.vocab, key=self.vocab.__getitem__)
        write_json(folder / "bm25.json", {"k1": self.k1, "b": self.b, "variant": self.variant,
                                          "analyzer": self.analyzer.config, "vocab": vocab})

    @classmethod
    def load(cls, folder: "str | Path") -> "BM25":
        folder = Path(folder)
        meta = read_json(folder / "bm25.json")
        self = cls(meta["k1"], meta["b"], meta["variant"], meta["analyzer"])
        arrays = load_arrays(folder / "bm25.safetensors")
        self.indptr, self.indices, self.data = arrays["indptr"], arrays["indices"], arrays["data"]
        self.doc_len, self.idf = arrays["doc_len"], arrays["idf"]
        self.vocab = {t: i for i, t in enumerate(meta["vocab"])}
        if self.indptr.shape[0] != len(self.vocab) + 1:
            raise ValueError(f"{folder}: bm25.safetensors has {self.indptr.shape[0] - 1} terms, bm25.json {len(self.vocab)}")
        return self
