"""Analysers and the Porter stemmer."""

import re

import pytest

from nanomm.rag.analysis import make_analyzer
from nanomm.rag.stem import porter_stem


@pytest.mark.parametrize("word, stem", [
    ("caresses", "caress"), ("ponies", "poni"), ("cats", "cat"), ("feed", "feed"), ("agreed", "agre"),
    ("plastered", "plaster"), ("motoring", "motor"), ("sing", "sing"), ("hopping", "hop"), ("filing", "file"),
    ("happy", "happi"), ("relational", "relat"), ("conditional", "condit"), ("generalization", "gener"),
    ("hopefulness", "hope"), ("electrical", "electr"), ("adjustment", "adjust"), ("adoption", "adopt"),
    ("controll", "control"), ("retrieval", "retriev"), ("is", "is"),
])
def test_porter_examples_from_the_paper(word, stem):
    assert porter_stem(word) == stem


def test_porter_equals_snowball_porter_on_python_docs_vocabulary():
    """Snowball's 'porter' is the 1980 algorithm; nanomm leaves words of <= 2 letters alone, as Porter's C code does."""
    Stemmer = pytest.importorskip("Stemmer")
    import pydoc_data.topics

    ref = Stemmer.Stemmer("porter")
    text = " ".join(list(pydoc_data.topics.topics.values())[:60]).lower()
    words = sorted({w for w in re.findall(r"[a-z]+", text) if len(w) > 2})
    assert len(words) > 1000
    assert [porter_stem(w) for w in words] == ref.stemWords(words)


@pytest.mark.parametrize("spec, text, expected", [
    ("english", "The Retrievers are retrieving!", ["retriev", "retriev"]),
    ({"name": "english", "stem": False}, "The Retrievers are retrieving!", ["retrievers", "retrieving"]),
    ({"name": "english", "stopwords": False, "stem": False}, "The cat", ["the", "cat"]),
    ("whitespace", "A b  C", ["a", "b", "c"]),
    ("english", "flash_attention v2", ["flash", "attent", "v2"]),
])
def test_english(spec, text, expected):
    assert make_analyzer(spec)(text) == expected


def test_chinese_segments_words_and_drops_punctuation_and_stop_words():
    pytest.importorskip("jieba")
    terms = make_analyzer("chinese")("检索增强生成的流程是什么？")
    assert "检索" in terms and "生成" in terms
    assert "的" not in terms and "？" not in terms


def test_mixed_sends_each_script_to_its_analyser():
    pytest.importorskip("jieba")
    terms = make_analyzer("mixed")("用 FAISS 做向量检索 with retrievers")
    assert {"faiss", "向量", "检索", "retriev"} <= set(terms)


def test_config_rebuilds_the_same_analyser():
    a = make_analyzer("english", stem=False)
    b = make_analyzer(a.config)
    assert a.config == b.config == {"name": "english", "stem": False}
    with pytest.raises(ValueError, match="options"):
        make_analyzer("english", colour="red")
    with pytest.raises(TypeError, match="text"):
        a(None)
