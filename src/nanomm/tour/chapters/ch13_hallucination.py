"""Topic 13, hallucination: three of the notes' mitigations, measured with nanomm's RAG pipeline.

- "let the model say I don't know": abstention on questions no page of docs/topics answers, against
  answering those it does (evidence threshold, nanomm.rag.grounding);
- "multi-path verification / self-consistency": agreement of k sampled answers, answerable vs not;
- the notes' factual hallucination, "Einstein invented relativity in 1921": the grounding check flags
  it against a source that gives 1905 / 1915, and passes the true sentence.
"""

from __future__ import annotations

import numpy as np

from nanomm.rag.chunking import Chunk
from nanomm.rag.grounding import check_grounding, evidence, threshold_for
from nanomm.rag.index import Hit
from nanomm.rag.pipeline import ask
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 13
TITLE = "Hallucination"
K = 5
SAMPLES = 5
TEMPERATURE = 0.1  # extractive sampling: softmax over sentence scores in [0, 1]; 0.1 lets close seconds win sometimes
SOURCE = "Einstein published special relativity in 1905 and general relativity in 1915."


def _plot(rows, thresholds: dict[str, float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(thresholds)
    fig, axes = plt.subplots(1, len(langs), figsize=(4 * len(langs), 3), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, lang in zip(axes[0], langs):
        for flag, label in ((True, "answerable"), (False, "unanswerable")):
            values = [r[2] for r in rows if r[0] == lang and r[1] == flag]
            ax.hist(values, bins, alpha=0.6, label=f"{label} ({len(values)})")
        ax.axvline(thresholds[lang], color="k", linestyle="--", label=f"threshold {thresholds[lang]:.2f}")
        ax.set_title(f"questions in {'English' if lang == 'en' else 'Chinese' if lang == 'zh' else lang}")
        ax.set_xlabel("evidence")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("questions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ctx: TourContext) -> Chapter:
    from nanomm.rag.demo import demo_index

    ix, questions = demo_index(ctx.quick)
    rows = []  # (language, answerable, evidence, threshold, agreement)
    for q in questions:
        a = ask(ix, q.question, k=K, samples=SAMPLES, temperature=TEMPERATURE, threshold=-1.0, seed=ctx.seed)
        s, kind = evidence(ix, q.question, a.hits)
        rows.append((q.lang, q.answerable, s, threshold_for(kind, q.lang), a.confidence))
    answerable = [r for r in rows if r[1]]
    unanswerable = [r for r in rows if not r[1]]
    answered = float(np.mean([s >= t for _, _, s, t, _ in answerable]))
    abstained = float(np.mean([s < t for _, _, s, t, _ in unanswerable]))
    balanced = (answered + abstained) / 2
    thresholds = {lang: threshold_for(kind, lang) for lang in sorted({r[0] for r in rows})}
    shown = ", ".join(f"{lang} {t:.2f}" for lang, t in thresholds.items())
    claims = [Claim(
        "letting the model say \"I don't know\" avoids answering what it cannot support", "让模型说\"我不知道\"",
        f"abstains on {abstained:.0%} of {len(unanswerable)} unanswerable questions, answers {answered:.0%} of "
        f"{len(answerable)} answerable (evidence thresholds {shown})",
        "holds" if balanced >= 0.75 else "approx", "measured on nanomm's question set over docs/topics")]
    agreement = {flag: [r[4] for r in rows if r[1] == flag] for flag in (True, False)}

    agree_a, agree_u = float(np.mean(agreement[True])), float(np.mean(agreement[False]))
    claims.append(Claim(
        "self-consistency: answers that agree across samples are more trustworthy", "多路验证 / 自我一致性",
        f"mean agreement of {SAMPLES} samples: {agree_a:.2f} on answerable vs {agree_u:.2f} on unanswerable questions",
        "holds" if agree_a > agree_u else "wrong", "Wang et al. 2023 (self-consistency)"))

    hits = [Hit(Chunk(0, "facts.txt", 0, len(SOURCE), SOURCE, "", 0), 1.0, 1)]
    wrong, right = "Einstein invented relativity in 1921 [1].", "Einstein published special relativity in 1905 [1]."
    checks = check_grounding(f"{wrong} {right}", hits, ix.bm25.analyzer)
    caught = [c.flagged for c in checks] == [True, False]
    claims.append(Claim(
        "factual hallucination: \"Einstein invented relativity in 1921\" (wrong: 1905/1915)",
        "\"爱因斯坦在 1921 年发明了相对论\"（错误：1905/1915）",
        f"grounding check against a source giving 1905/1915: 1921 sentence flagged {checks[0].flagged} "
        f"(numbers not in source: {checks[0].missing_numbers}), 1905 sentence flagged {checks[1].flagged}",
        "holds" if caught else "wrong", "Einstein 1905 (Ann. Phys. 17), 1915 (field equations)"))

    path = ctx.plot_path("ch13_evidence")
    _plot(rows, thresholds, path)
    sample = ask(ix, questions[-1].question, k=K)  # an unanswerable one: the set lists them last
    lines = [f"Evidence thresholds ({shown}): below them nanomm answers \"I don't know\" / \"我不知道\".",
             f"Unanswerable example — **Q:** {sample.question} **A:** {sample.text} (evidence {sample.evidence:.2f})"]
    demo = {"abstained on unanswerable": abstained, "answered answerable": answered,
            "agreement answerable": agree_a, "agreement unanswerable": agree_u}
    demo |= {f"threshold {lang}": t for lang, t in thresholds.items()}
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[path])
