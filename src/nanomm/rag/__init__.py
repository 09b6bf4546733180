"""Retrieval-augmented generation, from first principles: chunk, index (BM25 + dense), fuse, rerank, answer.

    from nanomm.rag import RagIndex, ask
    ix = RagIndex.build(["docs/topics"])           # chunks, BM25, MiniLM vectors (nanomm's BERT)
    ix.search("what is RMSNorm?", k=5, mode="hybrid")
    ask(ix, "什么是 RAG？").text                     # cited sentences, or 我不知道 when evidence is weak

Modules in reading order: text, chunking, stem, analysis, bm25, dense, sentences, fusion, rerank,
rewrite, index, generate, grounding, pipeline, evaluate, cli.
"""

from nanomm.rag.bm25 import BM25
from nanomm.rag.chunking import Chunk, Chunker, chunk_files, chunk_text
from nanomm.rag.fusion import fuse, rrf, score_fusion
from nanomm.rag.index import MODES, Hit, IndexConfig, RagIndex
from nanomm.rag.pipeline import Answer, ask

__all__ = ["BM25", "Chunk", "Chunker", "chunk_files", "chunk_text", "fuse", "rrf", "score_fusion", "MODES", "Hit",
           "IndexConfig", "RagIndex", "Answer", "ask"]
