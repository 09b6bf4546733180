"""Hallucination control: grounding flags, self-consistency vote, threshold calibration, abstention in ask()."""

import pytest

from nanomm.rag.analysis import make_analyzer
from nanomm.rag.generate import ExtractiveGenerator
from nanomm.rag.grounding import calibrate, check_grounding, vote
from nanomm.rag.pipeline import ask, format_answer

EN = make_analyzer("mixed")


@pytest.fixture(scope="module")
def hits(bm25_index):
    return bm25_index.search("BM25 k1 RMSNorm mean", 3, "bm25")


def test_supported_sentences_pass_and_invented_ones_are_flagged(hits):
    bm25_chunk = next(n for n, h in enumerate(hits, 1) if "k1 is 1.2" in h.chunk.text)
    answer = (f"The default k1 is 1.2 and b is 0.75 [{bm25_chunk}]. "  # supported, numbers present
              f"The default k1 is 2.5 [{bm25_chunk}]. "  # right words, wrong number: flagged
              "Einstein invented relativity in 1921.")  # nothing supports it: flagged
    checks = check_grounding(answer, hits, EN)
    assert [c.flagged for c in checks] == [False, True, True]
    assert checks[0].support == 1.0 and checks[0].source == bm25_chunk
    assert checks[1].missing_numbers == ["2.5"]
    assert checks[2].support < 0.6 and checks[2].missing_numbers == ["1921"]


def test_a_wrong_citation_is_flagged(hits):
    other = next(n for n, h in enumerate(hits, 1) if "k1 is 1.2" not in h.chunk.text)
    checks = check_grounding(f"The default k1 is 1.2 and b is 0.75 [{other}].", hits, EN)
    assert checks[0].flagged and checks[0].source == other


def test_abstentions_are_not_checked(hits):
    assert check_grounding("I don't know.", hits, EN) == []
    with pytest.raises(ValueError, match="min_support"):
        check_grounding("x", hits, EN, min_support=2)


def test_vote_takes_the_largest_group_of_equivalent_answers():
    samples = ["BM25 uses k1 to saturate term frequency [1].", "Paris is in France [2].",
               "BM25 uses k1 to saturate term frequency [3]", "k1 saturates term frequency in BM25 [1]."]
    answer, agreement, groups = vote(samples, EN)
    assert answer == samples[0] and agreement == 0.75 and groups == [0, 1, 0, 0]
    assert vote(["a b", "c d"], EN)[1] == 0.5  # a tie goes to the first group
    with pytest.raises(ValueError, match="samples"):
        vote([], EN)


def test_calibrate_finds_the_separating_threshold():
    best = calibrate([0.6, 0.7, 0.8], [0.1, 0.2, 0.55])
    assert 0.55 < best["threshold"] < 0.6 and best["balanced_accuracy"] == 1.0
    overlap = calibrate([0.3, 0.9], [0.5, 0.1])
    assert overlap["balanced_accuracy"] == 0.75
    with pytest.raises(ValueError, match="answerable"):
        calibrate([], [0.1])


@pytest.mark.parametrize("question, phrase", [("Who won the 2022 football World Cup?", "I don't know."),
                                              ("2022 年世界杯冠军是谁？", "我不知道。")])
def test_ask_abstains_in_the_question_language_when_evidence_is_weak(dense_index, question, phrase):
    a = ask(dense_index, question, k=3)
    assert a.abstained and a.text == phrase and a.evidence < a.threshold and a.citations == []


@pytest.mark.parametrize("question, phrase", [("Does RMSNorm subtract the mean?", "does not subtract the mean"),
                                              ("什么是大模型幻觉？", "和事实不符")])
def test_ask_answers_with_citations_when_evidence_is_strong(dense_index, question, phrase):
    a = ask(dense_index, question, k=3)
    assert not a.abstained and phrase in a.text and a.evidence >= a.threshold
    assert a.citations and all(dense_index.chunks[0].source.rsplit("/", 1)[0] in c["source"] for c in a.citations)
    assert a.flagged == []  # extractive answers quote their sources
    assert "[1]" in format_answer(a)


def test_self_consistency_reports_agreement(dense_index):
    a = ask(dense_index, "What does k1 control in BM25?", k=3, samples=8, temperature=5.0,
            generator=ExtractiveGenerator(max_sentences=1))
    assert len(a.samples) == 8 and 1 / 8 <= a.confidence <= 1.0
    assert a.text in a.samples
    sure = ask(dense_index, "What does k1 control in BM25?", k=3, samples=4, temperature=1e-3)
    assert sure.confidence == 1.0  # near-greedy sampling always picks the same sentences


def test_ask_rewrites(dense_index, bm25_index):
    assert not ask(bm25_index, "What is the default k1 of BM25?", rewrite="rm3").abstained
    with pytest.raises(ValueError, match="multi"):
        ask(dense_index, "What is BM25?", rewrite="multi")
    with pytest.raises(ValueError, match="samples"):
        ask(dense_index, "What is BM25?", samples=0)


def test_a_citation_after_the_full_stop_belongs_to_the_sentence_before(hits):
    bm25_chunk = next(n for n, h in enumerate(hits, 1) if "k1 is 1.2" in h.chunk.text)
    other = next(n for n, h in enumerate(hits, 1) if "root mean square" in h.chunk.text)
    text = (f"RMSNorm divides the activations by their root mean square. [{other}] "
            f"The default k1 is 1.2 and b is 0.75. [{bm25_chunk}]")
    checks = check_grounding(text, hits, EN)
    assert [c.source for c in checks] == [other, bm25_chunk] and not any(c.flagged for c in checks)


def test_multi_query_fuses_the_llm_paraphrases(bm25_index):
    from nanomm.rag.pipeline import retrieve

    class FakeLLM:  # an LLM generator as far as rewriting is concerned: complete() gives one query per line
        prompts = []

        def complete(self, prompt, n=1, temperature=0.0, **_):
            self.prompts.append(prompt)
            return ["1. ZeRO optimizer states partition\n2. stage 3 parameters"]

    llm = FakeLLM()
    question = "How is memory split between GPUs?"
    assert retrieve(bm25_index, question, k=3, mode="bm25") == []  # no word of it is in the corpus
    hits = retrieve(bm25_index, question, k=3, mode="bm25", rewrite="multi", generator=llm)
    assert question in llm.prompts[0]
    assert hits[0].chunk.source.endswith("zero.txt")  # the paraphrases found what the question's words miss
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
