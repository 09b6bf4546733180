"""A RAG index on disk: chunks + BM25 + dense vectors + sentence vectors, and the search modes over them.

  build:   files -> Chunker -> chunks ─┬─ analyser -> BM25 (sparse)      (both read "section\nchunk")
                                       ├─ encoder  -> chunk vectors (FAISS)
                                       └─ sentences of each chunk -> sentence vectors (rerank, evidence)
  search:  MODES[mode](index, query, k) -> [Hit], best first

Modes: "bm25", "bm25+rm3" (pseudo-relevance feedback), "dense", "hybrid" (weighted RRF of bm25 and
dense), "hybrid-score" (min-max score fusion), "rerank" (hybrid candidates reordered by sentence
max-sim, see rerank.py, or by a cross-encoder when ``index.cross_encoder`` is set). The folder holds index.json (config, sources and their SHA-256),
chunks.jsonl, and the parts' own files; everything is JSON or safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nanomm.rag.bm25 import BM25
from nanomm.rag.chunking import Chunk, chunk_files
from nanomm.rag.dense import DenseIndex, Encoder, make_encoder
from nanomm.rag.fusion import fuse
from nanomm.rag.rerank import CrossEncoderReranker, MaxSimReranker
from nanomm.rag.rewrite import rm3
from nanomm.rag.sentences import SentenceStore
from nanomm.rag.store import read_json, read_jsonl, write_json, write_jsonl

__all__ = ["IndexConfig", "Hit", "RagIndex", "MODES", "FORMAT_VERSION", "index_text"]

FORMAT_VERSION = 1


@dataclass
class IndexConfig:
    chunk_size: int = 128  # tokens per chunk (words; one per CJK character): ~170 MiniLM word pieces, under its 256
    overlap: int = 24  # tokens repeated between neighbouring chunks
    counter: str | None = None  # None: words + CJK characters; or a tokenizer.json path
    analyzer: str | dict = "mixed"  # BM25 analyser (see analysis.ANALYZERS)
    variant: str = "lucene"  # BM25 idf variant (see bm25.VARIANTS)
    k1: float = 1.2
    b: float = 0.75
    encoder: str | dict | None = "nanomm"  # dense encoder (see dense.ENCODERS); None: BM25 only
    sentence_vectors: bool = True  # embed every sentence too (reranking, extractive answers, abstention)
    context: bool = True  # index "section heading + chunk" so a chunk deep in a section still matches its topic

    @classmethod
    def from_dict(cls, d: dict) -> "IndexConfig":
        valid = {f.name for f in fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}; valid keys are {sorted(valid)}")
        return cls(**d)


@dataclass
class Hit:
    chunk: Chunk
    score: float
    rank: int

    def to_dict(self) -> dict:
        return {"text": self.chunk.text, "source": self.chunk.source, "start": self.chunk.start, "end": self.chunk.end,
                "score": self.score, "rank": self.rank, "chunk_id": self.chunk.id, "section": self.chunk.section}


def index_text(chunk: Chunk, context: bool = True) -> str:
    """What BM25 and the encoder see: the chunk, preceded by its section heading when it does not start with it."""
    if context and chunk.section and not chunk.text.startswith("#"):
        return f"{chunk.section}\n{chunk.text}"
    return chunk.text


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RagIndex:
    """Chunks with their BM25 index, optional chunk and sentence vectors, and the files they came from."""

    def __init__(self, config: IndexConfig, chunks: list[Chunk], bm25: BM25, dense: DenseIndex | None = None,
                 sentences: SentenceStore | None = None, sources: dict | None = None, encoder: Encoder | None = None):
        self.config, self.chunks, self.bm25, self.dense = config, chunks, bm25, dense
        self.sentences = sentences if sentences is not None else SentenceStore.from_chunks(chunks)
        self.sources = sources or {}
        self._encoder = encoder
        self._query_vecs: dict[str, np.ndarray] = {}
        self.reranker = MaxSimReranker()
        self.cross_encoder = None  # a crossencoder.CrossEncoder: when set, mode "rerank" uses it instead

    # ---- building and persistence ------------------------------------------------------------------

    @classmethod
    def build(cls, paths: Sequence["str | Path"], config: IndexConfig | None = None,
              encoder: Encoder | None = None) -> "RagIndex":
        config = config or IndexConfig()
        chunks, texts = chunk_files(paths, size=config.chunk_size, overlap=config.overlap, counter=config.counter)
        if not chunks:
            raise ValueError(f"paths: no text found in {[str(p) for p in paths]} (.md, .markdown and .txt files are read)")
        texts_in = [index_text(c, config.context) for c in chunks]
        bm25 = BM25(config.k1, config.b, config.variant, config.analyzer).index(texts_in)
        sentences = SentenceStore.from_chunks(chunks)
        dense = None
        if config.encoder is not None or encoder is not None:
            encoder = encoder or make_encoder(config.encoder)
            config = replace(config, encoder=encoder.spec)
            dense = DenseIndex(encoder.encode(texts_in))
            if config.sentence_vectors:
                sentences.vectors = encoder.encode([sentences.text(i, chunks) for i in range(len(sentences))])
        sources = {name: {"sha256": _sha256(t), "chars": len(t)} for name, t in texts.items()}
        return cls(config, chunks, bm25, dense, sentences, sources, encoder)

    def save(self, folder: "str | Path") -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "chunks.jsonl", [c.to_dict() for c in self.chunks])
        self.bm25.save(folder)
        self.sentences.save(folder)
        if self.dense is not None:
            self.dense.save(folder)
        write_json(folder / "index.json", {"format": FORMAT_VERSION, "config": asdict(self.config),
                                           "sources": self.sources, "n_chunks": len(self.chunks),
                                           "dense": self.dense is not None})
        return folder

    @classmethod
    def load(cls, folder: "str | Path", encoder: Encoder | None = None) -> "RagIndex":
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise FileNotFoundError(f"index: no index.json in {str(folder)!r}; build one with `nanomm rag index`")
        meta = read_json(folder / "index.json")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"index: format {meta.get('format')!r} is not supported; expected {FORMAT_VERSION} (rebuild it)")
        config = IndexConfig.from_dict(meta["config"])
        chunks = [Chunk.from_dict(d) for d in read_jsonl(folder / "chunks.jsonl")]
        dense = DenseIndex.load(folder) if meta.get("dense") else None
        return cls(config, chunks, BM25.load(folder), dense, SentenceStore.load(folder), meta["sources"], encoder)

    # ---- querying ----------------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            if self.config.encoder is None:
                raise ValueError("mode: this index has no dense part (built with encoder=None); use mode 'bm25'")
            self._encoder = make_encoder(self.config.encoder)
        return self._encoder

    def query_vector(self, query: str) -> np.ndarray:
        if query not in self._query_vecs:
            self._query_vecs[query] = self.encoder.encode([query])[0]
        return self._query_vecs[query]

    def search(self, query: str, k: int = 5, mode: str = "hybrid", **options) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query: expected a non-empty string, got {query!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if mode not in SPARSE_MODES and self.dense is None:
            raise ValueError(f"mode: {mode!r} needs the dense part, and this index was built without an encoder")
        ranked = MODES[mode](self, query, k, **options)
        return [Hit(self.chunks[d], float(s), r) for r, (d, s) in enumerate(ranked[:k], 1)]


# ---- the modes: (index, query, k, **options) -> [(chunk id, score)], best first ------------------------

def _bm25(ix: RagIndex, query: str, k: int) -> list[tuple[int, float]]:
    return ix.bm25.search(query, k)


def _bm25_rm3(ix: RagIndex, query: str, k: int, fb_docs: int = 10, fb_terms: int = 10, lam: float = 0.5):
    first = ix.bm25.search(query, fb_docs)
    analyse, context = ix.bm25.analyzer, ix.config.context
    expanded = rm3(analyse(query), [(analyse(index_text(ix.chunks[d], context)), s) for d, s in first],
                   n_terms=fb_terms, lam=lam)
    return ix.bm25.search(expanded, k) if expanded else []


def _dense(ix: RagIndex, query: str, k: int) -> list[tuple[int, float]]:
    scores, ids = ix.dense.search(ix.query_vector(query), k)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def _hybrid(ix: RagIndex, query: str, k: int, fusion: str = "rrf", weights: dict | None = None, depth: int = 50):
    depth = max(depth, k)
    runs = {"bm25": _bm25(ix, query, depth), "dense": _dense(ix, query, depth)}
    return fuse(runs, fusion, weights, k=max(k, depth))


def _hybrid_score(ix: RagIndex, query: str, k: int, weights: dict | None = None, depth: int = 50):
    return _hybrid(ix, query, k, "score", weights, depth)


def _rerank(ix: RagIndex, query: str, k: int, candidates: int = 30, alpha: float | None = None):
    first = _hybrid(ix, query, candidates)[:candidates]
    if ix.cross_encoder is not None:
        texts = [index_text(ix.chunks[d], ix.config.context) for d, _ in first]
        return CrossEncoderReranker(ix.cross_encoder.predict).rerank_texts(query, first, texts)
    if ix.sentences.vectors is None:  # no sentence vectors: the first stage stands
        return first
    reranker = ix.reranker if alpha is None else MaxSimReranker(alpha)
    return reranker.rerank(ix.query_vector(query), first, ix.sentences)


SPARSE_MODES = ("bm25", "bm25+rm3")  # the modes an index without an encoder serves
MODES: dict[str, Callable[..., list[tuple[int, float]]]] = {
    "bm25": _bm25,
    "bm25+rm3": _bm25_rm3,
    "dense": _dense,
    "hybrid": _hybrid,
    "hybrid-score": _hybrid_score,
    "rerank": _rerank,
}
