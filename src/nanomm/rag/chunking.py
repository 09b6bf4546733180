"""Structure-aware chunking: cut documents where their structure allows, never lose a character's origin.

A document is read as markdown (plain text is markdown without headings):

  section   a heading line starts one; chunks never cross a heading, so a chunk talks about one topic
  block     paragraphs (blank-line separated), list items, table rows, code-fence lines
  sentence  blocks are cut after . ! ? (before whitespace) and after 。！？； (Chinese needs no space)
  token     only a sentence longer than the chunk size is cut between tokens

Units of the finest level needed are packed greedily into chunks of at most ``size`` tokens; the next
chunk repeats the trailing units of the previous one up to ``overlap`` tokens, so a fact that straddles
a cut is whole in at least one chunk. Every chunk records (source, start, end) with
``source_text[start:end] == chunk.text`` — retrieval evaluation and citations point at exact spans.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from nanomm.rag.text import TokenCounter, make_counter, sentence_spans

__all__ = ["Chunk", "Chunker", "chunk_text", "chunk_files", "iter_corpus_files", "text_units", "CORPUS_SUFFIXES"]

CORPUS_SUFFIXES = (".md", ".markdown", ".txt")
_HEADING = re.compile(r"#{1,6}\s")
_FENCE = re.compile(r"(```|~~~)")
_ITEM = re.compile(r"([-*+]|\d+[.)])\s|\|")  # a list item or a table row starts a block of its own


@dataclass(frozen=True)
class Chunk:
    id: int
    source: str  # path of the source file as indexed
    start: int  # character offsets: source_text[start:end] == text
    end: int
    text: str
    section: str = ""  # the heading this chunk sits under ("" before the first heading)
    n_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Chunk":
        return cls(**{k: d[k] for k in ("id", "source", "start", "end", "text", "section", "n_tokens")})


@dataclass
class _Unit:
    start: int
    end: int
    n: int


def _lines(text: str) -> Iterable[tuple[int, int]]:
    """(start, end) of each line, without its newline."""
    pos = 0
    for line in text.splitlines(keepends=True):
        yield pos, pos + len(line.rstrip("\r\n"))
        pos += len(line)


def _sections(text: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """Split into sections of (heading, [sentence-or-line spans]) following the markdown structure."""
    sections: list[tuple[str, list[tuple[int, int]]]] = [("", [])]
    block: list[int] = []  # [start, end] of the open paragraph block
    in_code = False

    def close_block():
        if block:
            sections[-1][1].extend(sentence_spans(text, block[0], block[1]))
            block.clear()

    for s, e in _lines(text):
        stripped = text[s:e].strip()
        lead = s + len(text[s:e]) - len(text[s:e].lstrip())
        if _FENCE.match(stripped):
            close_block()
            in_code = not in_code
            sections[-1][1].append((lead, lead + len(stripped)))
        elif in_code:
            if stripped:  # code is cut at lines, never inside a line's "sentences"
                sections[-1][1].append((lead, lead + len(stripped)))
        elif not stripped:
            close_block()
        elif _HEADING.match(stripped):
            close_block()
            sections.append((stripped.lstrip("#").strip(), [(lead, lead + len(stripped))]))
        elif _ITEM.match(stripped):
            close_block()
            block[:] = [lead, e]
        elif block:
            block[1] = e
        else:
            block[:] = [lead, e]
    close_block()
    return [sec for sec in sections if sec[1]]


def text_units(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences, headings, list items, table rows and code lines of ``text``, in order."""
    return [span for _, spans in _sections(text) for span in spans]


def _merge_token_spans(spans: list[tuple[int, int]]) -> list[_Unit]:
    """Tokens sharing characters (byte-level BPE splits one CJK char in several) form one atomic unit."""
    units: list[_Unit] = []
    for b, e in spans:
        if units and b < units[-1].end:
            units[-1].end = max(units[-1].end, e)
            units[-1].n += 1
        else:
            units.append(_Unit(b, e, 1))
    return units


class Chunker:
    """Cuts text into chunks of at most ``size`` tokens with up to ``overlap`` tokens repeated between neighbours."""

    def __init__(self, size: int = 200, overlap: int = 40, counter: "str | TokenCounter | None" = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
            raise ValueError(f"overlap: expected an int in [0, size={size}), got {overlap!r}")
        self.size, self.overlap = size, overlap
        self.counter = make_counter(counter)

    def _units(self, text: str, spans: list[tuple[int, int]]) -> list[_Unit]:
        units = []
        for s, e in spans:
            toks = self.counter.spans(text, s, e)
            if len(toks) <= self.size:
                if toks:
                    units.append(_Unit(s, e, len(toks)))
            else:  # a sentence longer than a chunk: fall back to token units
                units.extend(_merge_token_spans(toks))
        return units

    def _pack(self, units: list[_Unit]) -> list[list[_Unit]]:
        groups, cur, total = [], [], 0
        for u in units:
            if cur and total + u.n > self.size:
                groups.append(cur)
                keep, kept = [], 0  # the tail of the previous chunk, up to `overlap` tokens
                for prev in reversed(cur):
                    if kept + prev.n > self.overlap or kept + prev.n + u.n > self.size:
                        break
                    keep.insert(0, prev)
                    kept += prev.n
                cur, total = keep, kept
            cur.append(u)
            total += u.n
        if cur:
            groups.append(cur)
        return groups

    def chunk(self, text: str, source: str = "", first_id: int = 0) -> list[Chunk]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        chunks = []
        for heading, spans in _sections(text):
            for group in self._pack(self._units(text, spans)):
                s, e = group[0].start, group[-1].end
                chunks.append(Chunk(first_id + len(chunks), source, s, e, text[s:e], heading, sum(u.n for u in group)))
        return chunks


def chunk_text(text: str, source: str = "", *, size: int = 200, overlap: int = 40,
               counter: "str | TokenCounter | None" = None) -> list[Chunk]:
    """Chunks of one string (see :class:`Chunker`)."""
    return Chunker(size, overlap, counter).chunk(text, source)


def iter_corpus_files(paths: Iterable["str | Path"]) -> list[Path]:
    """Files named, and the .md/.markdown/.txt files under folders named, sorted, without duplicates."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"paths: expected existing files or folders, got {str(p)!r} which does not exist")
    seen, unique = set(), []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def source_name(path: Path) -> str:
    """How a file is recorded: relative to the working directory when under it, else absolute (posix)."""
    try:
        rel = os.path.relpath(path.resolve(), Path.cwd())
        if not rel.startswith(".."):
            return Path(rel).as_posix()
    except ValueError:  # another drive on Windows
        pass
    return path.resolve().as_posix()


def chunk_files(paths: Iterable["str | Path"], *, size: int = 200, overlap: int = 40,
                counter: "str | TokenCounter | None" = None) -> tuple[list[Chunk], dict[str, str]]:
    """Chunks of every corpus file under ``paths`` (ids run across files) and {source: full text}."""
    chunker = Chunker(size, overlap, counter)
    chunks: list[Chunk] = []
    texts: dict[str, str] = {}
    for f in iter_corpus_files(paths):
        text = f.read_text(encoding="utf-8")
        name = source_name(f)
        texts[name] = text
        chunks.extend(chunker.chunk(text, name, first_id=len(chunks)))
    return chunks, texts
