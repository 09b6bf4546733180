"""The RAG index: every mode returns exact source spans; save/load gives the same results."""

import pytest

from nanomm.rag.index import MODES, IndexConfig, RagIndex, index_text

QUESTIONS = {
    "What does k1 control in BM25?": ("rag.md", "saturation controlled by k1"),
    "Does RMSNorm subtract the mean?": ("norm.md", "does not subtract the mean"),
    "什么是大模型幻觉？": ("norm.md", "大模型幻觉是指"),
    "Which ZeRO stage partitions the parameters?": ("notes/zero.txt", "stage 3 the parameters"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_ranks_the_answer_first_with_exact_offsets(dense_index, corpus_dir, mode):
    for question, (source, phrase) in QUESTIONS.items():
        hits = dense_index.search(question, 3, mode)
        assert hits and [h.rank for h in hits] == list(range(1, len(hits) + 1))
        text = (corpus_dir / hits[0].chunk.source.split(corpus_dir.name + "/")[-1]).read_text(encoding="utf-8")
        assert text[hits[0].chunk.start:hits[0].chunk.end] == hits[0].chunk.text
        assert hits[0].chunk.source.endswith(source) and phrase in hits[0].chunk.text, (mode, question)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_save_and_load_give_the_same_results(dense_index, tmp_path):
    dense_index.save(tmp_path / "ix")
    back = RagIndex.load(tmp_path / "ix", encoder=dense_index.encoder)
    assert back.config == dense_index.config and len(back.chunks) == len(dense_index.chunks)
    for mode in MODES:
        a = [(h.chunk.id, round(h.score, 5)) for h in dense_index.search("What is BM25?", 4, mode)]
        b = [(h.chunk.id, round(h.score, 5)) for h in back.search("What is BM25?", 4, mode)]
        assert a == b, mode
    assert not list((tmp_path / "ix").glob("*.tmp"))


def test_an_index_without_encoder_serves_bm25_only(bm25_index, tmp_path):
    assert bm25_index.dense is None and bm25_index.sentences.vectors is None
    assert bm25_index.search("k1 saturation", 2, "bm25")[0].chunk.section == "BM25"
    with pytest.raises(ValueError, match="dense"):
        bm25_index.search("k1", 2, "hybrid")
    bm25_index.save(tmp_path / "b")
    assert RagIndex.load(tmp_path / "b").dense is None


@pytest.mark.parametrize("kwargs, match", [({"query": ""}, "query"), ({"k": 0}, "k: expected"), ({"mode": "magic"}, "mode")])
def test_search_rejects_bad_arguments(bm25_index, kwargs, match):
    args = {"query": "bm25", "k": 3, "mode": "bm25", **kwargs}
    with pytest.raises(ValueError, match=match):
        bm25_index.search(args["query"], args["k"], args["mode"])


def test_config_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        IndexConfig.from_dict({"chunk_size": 10, "colour": 1})
    with pytest.raises(FileNotFoundError, match="index.json"):
        RagIndex.load(tmp_path)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no text"):
        RagIndex.build([tmp_path], IndexConfig(encoder=None))


def test_rerank_uses_a_cross_encoder_when_one_is_set(dense_index):
    class LongestFirst:  # a stand-in scorer: the longer passage is "more relevant"
        def predict(self, pairs):
            return [float(len(p)) for _, p in pairs]

    dense_index.cross_encoder = LongestFirst()
    try:
        hits = dense_index.search("What is BM25?", 3, "rerank")
    finally:
        dense_index.cross_encoder = None
    lengths = [h.score for h in hits]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == max(
        len(index_text(c)) for c in dense_index.chunks if c.id in {h.chunk.id for h in dense_index.search("What is BM25?", 30, "hybrid")})
