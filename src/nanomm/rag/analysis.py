"""Analysers: text -> index terms, the same function for documents and queries.

  english   lower-case \\w+ words, drop stop words, optional Porter stemming ("indexing" == "indexed")
  chinese   jieba word segmentation (Sun Junyi's jieba: a prefix dictionary DAG + HMM for unknown words),
            punctuation and stop words dropped
  mixed     (default) CJK runs go to jieba, the rest to the English analyser — notes in Chinese quote
            English terms ("用 FAISS 做向量检索"), and English docs quote Chinese ones
  whitespace  lower-cased split on whitespace, for callers that tokenise themselves

An analyser is described by a JSON-able dict ({"name": ..., options}) so a saved index re-creates it.
"""

from __future__ import annotations

import re
from typing import Callable

from nanomm.rag.stem import porter_stem
from nanomm.rag.text import CJK

__all__ = ["Analyzer", "ANALYZERS", "make_analyzer", "ENGLISH_STOPWORDS", "CHINESE_STOPWORDS"]

# Function words that carry no topic: articles, pronouns, auxiliaries, prepositions, conjunctions.
ENGLISH_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours ourselves out over own same she should so
some such than that the their theirs them themselves then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your
yours yourself yourselves s t
""".split())
CHINESE_STOPWORDS = frozenset("的 了 是 在 和 与 及 或 也 就 都 而 把 被 让 给 对 从 这 那 之 其 一个 我 你 他 她 它 们 吗 呢 吧 啊 么 什么 怎么 如何 为什么".split())

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # letters and digits; underscores split identifiers
_SCRIPT_RUNS = re.compile(f"[{CJK}]+|[^{CJK}]+")


class Analyzer:
    """Callable text -> list of terms, with a JSON-able ``config`` that rebuilds it."""

    def __init__(self, fn: Callable[[str], list[str]], config: dict):
        self._fn, self.config = fn, config

    def __call__(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._fn(text)


def _english(stem: bool = True, stopwords: bool = True, lowercase: bool = True) -> Callable[[str], list[str]]:
    stop = ENGLISH_STOPWORDS if stopwords else frozenset()

    def analyse(text: str) -> list[str]:
        words = _WORD.findall(text.lower() if lowercase else text)
        words = [w for w in words if w not in stop]
        return [porter_stem(w) for w in words] if stem else words

    return analyse


_jieba = None


def _load_jieba():
    global _jieba
    if _jieba is None:
        try:
            import logging

            import jieba
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the chinese analyser needs jieba: pip install jieba") from e
        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def _chinese(stopwords: bool = True, search_mode: bool = False) -> Callable[[str], list[str]]:
    stop = CHINESE_STOPWORDS if stopwords else frozenset()

    def analyse(text: str) -> list[str]:
        jb = _load_jieba()
        cut = jb.lcut_for_search if search_mode else jb.lcut
        out = []
        for w in cut(text):
            w = w.strip().lower()
            if w and _WORD.fullmatch(w) and w not in stop:  # drops punctuation and spaces
                out.append(w)
        return out

    return analyse


def _mixed(stem: bool = True, stopwords: bool = True, search_mode: bool = False) -> Callable[[str], list[str]]:
    en, zh = _english(stem, stopwords), _chinese(stopwords, search_mode)
    cjk = re.compile(f"[{CJK}]")

    def analyse(text: str) -> list[str]:
        out: list[str] = []
        for run in _SCRIPT_RUNS.findall(text):
            out.extend(zh(run) if cjk.match(run) else en(run))
        return out

    return analyse


def _whitespace(lowercase: bool = True) -> Callable[[str], list[str]]:
    return lambda text: (text.lower() if lowercase else text).split()


ANALYZERS: dict[str, Callable[..., Callable[[str], list[str]]]] = {
    "english": _english,
    "chinese": _chinese,
    "mixed": _mixed,
    "whitespace": _whitespace,
}


def make_analyzer(spec: "str | dict | Analyzer | None" = None, **options) -> Analyzer:
    """An analyser from a name in ANALYZERS (default 'mixed'), a config dict, or an Analyzer."""
    if isinstance(spec, Analyzer):
        return spec
    if spec is None:
        spec = "mixed"
    if isinstance(spec, dict):
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        spec = spec.get("name")
    if spec not in ANALYZERS:
        raise ValueError(f"analyzer: expected one of {sorted(ANALYZERS)}, got {spec!r}")
    try:
        fn = ANALYZERS[spec](**options)
    except TypeError as e:
        raise ValueError(f"analyzer options for {spec!r}: {e}") from None
    return Analyzer(fn, {"name": spec, **options})
