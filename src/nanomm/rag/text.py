"""Text primitives shared by the RAG modules: CJK detection, sentence spans, token counters.

Everything here works on *spans* — (start, end) character offsets into the original string — rather
than on copies of substrings, so that every chunk, sentence and token can be traced back to the exact
characters of its source: ``text[start:end]`` is always the piece.

Token counters decide how "size" is measured when chunking. The default counts a whitespace-separated
word as one token and every CJK character as one token (Chinese has no spaces; one character is
close to one BPE token for most tokenizers). Any Hugging Face ``tokenizers.Tokenizer`` can be used
instead, through its character offsets.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

__all__ = ["CJK", "is_cjk", "has_cjk", "language", "sentence_spans", "TokenCounter", "WordCJKCounter",
           "HFTokenizerCounter", "make_counter"]

# CJK Unified Ideographs (+ extension A, compatibility), kana and hangul: scripts written without spaces.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_RE = re.compile(f"[{CJK}]")
# One token = one CJK character, or a maximal run of other non-space characters.
_TOKEN_RE = re.compile(f"[{CJK}]|[^\\s{CJK}]+")
# A sentence ends after . ! ? (followed by whitespace) or after the full-width 。！？； (no space needed),
# taking closing quotes and brackets with it.
_SENT_END_RE = re.compile(r"(?:[.!?]+[\"'”’)\]]*(?=\s)|[。！？；]+[”’」』）)\]]*)")
# A period after these ends no sentence ("Lewis et al. 2020", "e.g. BM25").
_ABBREVIATION_RE = re.compile(r"\b(?:e\.g|i\.e|et al|etc|vs|cf|fig|figs|eq|eqs|sec|vol|approx|resp|dr|mr|mrs|ms)\.$", re.IGNORECASE)


def is_cjk(ch: str) -> bool:
    return bool(_CJK_RE.match(ch))


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def language(text: str) -> str:
    """'zh' when at least a fifth of the non-space characters are CJK, else 'en' (used to pick the abstain phrase)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(map(is_cjk, chars)) * 5 >= len(chars) else "en"


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text[start:end]``, stripped of surrounding whitespace, never empty."""
    end = len(text) if end is None else end
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"start, end: expected 0 <= start <= end <= {len(text)}, got ({start}, {end})")
    spans, cur = [], start
    for m in _SENT_END_RE.finditer(text, start, end):
        if text[m.start()] == "." and m.end() - m.start() == 1 and _ABBREVIATION_RE.search(text, max(start, m.start() - 7), m.end()):
            continue
        s, e = _strip_span(text, cur, m.end())
        if e > s:
            spans.append((s, e))
        cur = m.end()
    s, e = _strip_span(text, cur, end)
    if e > s:
        spans.append((s, e))
    return spans


@runtime_checkable
class TokenCounter(Protocol):
    """Measures text in tokens. ``spans`` gives each token's (start, end); chunking cuts only between them."""

    def spans(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]: ...

    def count(self, text: str) -> int: ...


class WordCJKCounter:
    """Default counter: a run of non-space characters is a token, and so is each CJK character."""

    name = "word_cjk"

    def spans(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        end = len(text) if end is None else end
        return [m.span() for m in _TOKEN_RE.finditer(text, start, end)]

    def count(self, text: str) -> int:
        return sum(1 for _ in _TOKEN_RE.finditer(text))


class HFTokenizerCounter:
    """Counts with a Hugging Face ``tokenizers.Tokenizer`` (e.g. the retriever's own WordPiece), by its offsets."""

    def __init__(self, tokenizer):
        if not hasattr(tokenizer, "encode"):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.name = "hf"

    @classmethod
    def from_file(cls, path) -> "HFTokenizerCounter":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def spans(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        end = len(text) if end is None else end
        enc = self.tokenizer.encode(text[start:end], add_special_tokens=False)
        # Offsets are character positions in the piece; several sub-tokens can share one (b, e): keep them
        # as separate tokens (they count) but clip to the piece so cuts stay inside it.
        out = []
        for b, e in enc.offsets:
            if e > b:
                out.append((start + b, start + e))
        return out

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def make_counter(spec: "str | TokenCounter | None" = None) -> TokenCounter:
    """A counter from ``None``/'word_cjk' (default), a path to a tokenizer.json, or a counter object."""
    if spec is None or spec == "word_cjk":
        return WordCJKCounter()
    if isinstance(spec, str):
        return HFTokenizerCounter.from_file(spec)
    if isinstance(spec, TokenCounter):
        return spec
    raise TypeError(f"counter: expected None, 'word_cjk', a tokenizer.json path or a TokenCounter, got {type(spec).__name__}")
