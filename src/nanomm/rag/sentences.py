"""Sentence-level evidence: every sentence of every chunk, with its span and (optionally) its embedding.

A chunk of 100+ words averages several facts into one vector; the sentence that answers a question is
sharper. Sentences serve three readers: the reranker (max over a chunk's sentences of cos(q, s)), the
extractive generator (which sentences to quote) and abstention (how strong the best evidence is).
Spans are absolute offsets into the chunk's source, like the chunks' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nanomm.rag.chunking import Chunk, text_units
from nanomm.rag.store import load_arrays, save_arrays

__all__ = ["SentenceStore"]


@dataclass
class SentenceStore:
    chunk: np.ndarray  # (S,) int32: chunk id of each sentence
    start: np.ndarray  # (S,) int64: offsets into the chunk's source
    end: np.ndarray
    vectors: np.ndarray | None = None  # (S, d) float32 unit rows, or None without an encoder

    @classmethod
    def from_chunks(cls, chunks: Sequence[Chunk]) -> "SentenceStore":
        rows = []
        for c in chunks:
            for s, e in text_units(c.text):
                rows.append((c.id, c.start + s, c.start + e))
        arr = np.asarray(rows, np.int64).reshape(-1, 3)
        return cls(arr[:, 0].astype(np.int32), arr[:, 1], arr[:, 2])

    def __len__(self) -> int:
        return int(self.chunk.shape[0])

    def text(self, i: int, chunks: Sequence[Chunk]) -> str:
        c = chunks[int(self.chunk[i])]
        return c.text[int(self.start[i]) - c.start: int(self.end[i]) - c.start]

    def of_chunks(self, chunk_ids: Sequence[int]) -> np.ndarray:
        """Indices of the sentences of the given chunks, in chunk order."""
        if len(chunk_ids) == 0:
            return np.zeros(0, np.int64)
        lo = np.searchsorted(self.chunk, chunk_ids, side="left")
        hi = np.searchsorted(self.chunk, chunk_ids, side="right")
        return np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])

    def max_sim(self, query_vec: np.ndarray, chunk_ids: Sequence[int]) -> dict[int, tuple[float, int]]:
        """{chunk id: (max cosine of its sentences to the query, index of that sentence)}."""
        if self.vectors is None:
            raise ValueError("vectors: this index has no sentence embeddings (built without an encoder)")
        idx = self.of_chunks(chunk_ids)
        sims = self.vectors[idx] @ np.asarray(query_vec, np.float32).reshape(-1)  # (S_sel,)
        out: dict[int, tuple[float, int]] = {}
        for i, s in zip(idx.tolist(), sims.tolist()):
            c = int(self.chunk[i])
            if c not in out or s > out[c][0]:
                out[c] = (s, i)
        return out

    def save(self, folder: "str | Path") -> None:
        arrays = {"chunk": self.chunk, "start": self.start, "end": self.end}
        if self.vectors is not None:
            arrays["vectors"] = self.vectors
        save_arrays(Path(folder) / "sentences.safetensors", arrays)

    @classmethod
    def load(cls, folder: "str | Path") -> "SentenceStore":
        a = load_arrays(Path(folder) / "sentences.safetensors")
        return cls(a["chunk"], a["start"], a["end"], a.get("vectors"))
