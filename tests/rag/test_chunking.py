"""Chunking: exact offsets into the source, size and overlap bounds, structure respected."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.rag.chunking import Chunker, chunk_files, chunk_text, iter_corpus_files
from nanomm.rag.text import HFTokenizerCounter, WordCJKCounter, language, sentence_spans

# Pieces that exercise every rule: headings, blank lines, list items, fences, both punctuations, CJK runs.
PIECES = ["# ", "## ", "\n", "\n\n", " ", "  ", ". ", "! ", "? ", "。", "！", "？", "；", "- ", "1. ", "| ",
          "```", "word", "Alpha", "x", "检索", "增强", "生成", "“", "”", "\t", "\u2028", "(a)", "e.g."]
texts = st.lists(st.sampled_from(PIECES), max_size=80).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=texts, size=st.integers(1, 12), overlap_frac=st.floats(0, 0.99))
def test_every_chunk_is_the_exact_slice_of_its_source(text, size, overlap_frac):
    overlap = min(size - 1, int(size * overlap_frac))
    chunks = Chunker(size, overlap).chunk(text, "doc.md")
    counter = WordCJKCounter()
    covered = set()
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.source == "doc.md"
        assert c.text == c.text.strip() and c.text
        # n_tokens sums the packed units; a token can only merge across a unit cut, never split
        assert counter.count(c.text) <= c.n_tokens <= size
        covered.update(range(c.start, c.end))
    # nothing is lost: every non-space character lies in some chunk
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    # chunks advance, and neighbours share at most `overlap` tokens
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start and a.end < b.end
        if b.start < a.end:
            assert counter.count(text[b.start:a.end]) <= overlap


def test_a_heading_starts_a_new_chunk_and_names_its_section():
    text = "# RAG\n\nRetrieve first. Then generate.\n\n## BM25\n\nTerm frequency saturates."
    chunks = chunk_text(text, size=50, overlap=0)
    assert [c.section for c in chunks] == ["RAG", "BM25"]
    assert chunks[1].text == "## BM25\n\nTerm frequency saturates."


@pytest.mark.parametrize("text, expected", [
    ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    ("先检索。再生成！对吗？对；好", ["先检索。", "再生成！", "对吗？", "对；", "好"]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    ("v1.5 is out. e.g.x stays", ["v1.5 is out.", "e.g.x stays"]),  # no cut without a following space
])
def test_sentence_spans(text, expected):
    assert [text[s:e] for s, e in sentence_spans(text)] == expected


def test_overlap_repeats_the_tail_of_the_previous_chunk():
    text = "A a. B b. C c. D d. E e."
    chunks = chunk_text(text, size=4, overlap=2)
    assert [c.text for c in chunks] == ["A a. B b.", "B b. C c.", "C c. D d.", "D d. E e."]


def test_a_sentence_longer_than_the_size_is_cut_between_tokens():
    text = "一二三四五六七八九十"
    chunks = chunk_text(text, size=4, overlap=1)
    assert [c.text for c in chunks] == ["一二三四", "四五六七", "七八九十"]


def test_code_fences_are_cut_at_lines_not_sentences():
    text = "```\nx = 1. y = 2\nprint(x)\n```"
    chunks = chunk_text(text, size=6, overlap=0)
    assert "x = 1. y = 2" in [c.text for c in chunks]


def test_a_tokenizers_tokenizer_can_measure_size(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    counter = HFTokenizerCounter(tok)
    text = "a a. a, a a."  # Whitespace splits punctuation off: 7 tokens
    chunks = chunk_text(text, size=4, overlap=0, counter=counter)
    assert all(counter.count(c.text) <= 4 for c in chunks)
    assert all(text[c.start:c.end] == c.text for c in chunks)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 0}, "size"), ({"size": 4, "overlap": 4}, "overlap"), ({"size": 4, "overlap": -1}, "overlap"),
    ({"size": 2.5}, "size"),
])
def test_bad_sizes_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Chunker(**kwargs)


def test_chunk_files_reads_folders_and_numbers_chunks_across_files(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("# A\n\nFirst file.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("第二个文件。", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    monkeypatch.chdir(tmp_path)
    chunks, texts = chunk_files([tmp_path])
    assert [c.source for c in chunks] == ["a.md", "sub/b.txt"]
    assert [c.id for c in chunks] == [0, 1]
    assert all(texts[c.source][c.start:c.end] == c.text for c in chunks)
    with pytest.raises(ValueError, match="does not exist"):
        iter_corpus_files([tmp_path / "nope"])


@pytest.mark.parametrize("text, lang", [("What is RAG?", "en"), ("什么是 RAG？", "zh"), ("", "en")])
def test_language(text, lang):
    assert language(text) == lang


@pytest.mark.parametrize("text, expected", [
    ("Lewis et al. 2020 did it. Then e.g. BM25 works.", ["Lewis et al. 2020 did it.", "Then e.g. BM25 works."]),
    ("See Fig. 3 and Eq. 7. The width is d. Next.", ["See Fig. 3 and Eq. 7.", "The width is d.", "Next."]),
])
def test_abbreviations_end_no_sentence(text, expected):
    assert [text[s:e] for s, e in sentence_spans(text)] == expected
