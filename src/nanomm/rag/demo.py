"""The index and questions the tour chapters (13, 19) share: docs/topics with the shipped question set.

Built once per process. ``quick`` keeps the pages the questions of a few topics point at (RAG,
hallucination, RMSNorm), so MiniLM embeds a few dozen chunks instead of hundreds.
"""

from __future__ import annotations

from functools import lru_cache

from nanomm.rag.evaluate import Question, default_corpus, default_questions, load_questions, same_source
from nanomm.rag.index import IndexConfig, RagIndex

__all__ = ["demo_index", "QUICK_PAGES"]

QUICK_PAGES = ("13-hallucination.md", "16-rmsnorm.md", "19-rag.md")


@lru_cache(maxsize=2)
def demo_index(quick: bool = False) -> tuple[RagIndex, list[Question]]:
    corpus = default_corpus()
    if not corpus.is_dir():
        raise FileNotFoundError(f"the demo corpus {corpus} is missing (nanomm's docs/topics ships with a source checkout)")
    files = sorted(corpus.glob("*.md"))
    if quick:
        files = [f for f in files if f.name in QUICK_PAGES]
    questions, _ = load_questions(default_questions())
    names = [f.as_posix() for f in files]
    questions = [q for q in questions if not q.answerable or
                 all(any(same_source(s.source, n) for n in names) for s in q.relevant)]
    return RagIndex.build(files, IndexConfig()), questions
