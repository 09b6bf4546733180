"""Chapter 2 recounts the notes' model sizes with nanomm's models and gives the audit's verdicts."""

from __future__ import annotations

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch02_gpt_bert_sizes as ch02


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch02.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch02.ID, ch02.TITLE) == (2, "GPT and BERT: structure and sizes")


def test_size_verdicts_follow_the_audit(chapter):
    sizes = {c.claim.split(":")[0]: c.verdict for c in chapter.claims if c.claim.endswith("parameter count")}
    assert sizes == {"bert-base": "approx", "bert-large": "wrong", "gpt1": "approx", "gpt2-xl": "holds",
                     "gpt3-175b": "holds"}
    gpt4 = next(c for c in chapter.claims if c.claim.startswith("GPT-4"))
    assert gpt4.verdict == "unverifiable"


def test_structures_hold_and_direction_is_measured(chapter):
    structure = [c for c in chapter.claims if c.claim.endswith("layers, width, heads")]
    assert len(structure) == 5 and all(c.verdict == "holds" for c in structure)
    d = chapter.demo
    assert d["gpt_first_output_change"] == 0.0 < 1e-4 < d["bert_first_output_change"]  # causal vs bidirectional


def test_exact_counts_and_meta_builds(chapter):
    d = chapter.demo
    assert (d["bert-base_params"], d["bert-large_params"], d["gpt1_params"]) == (109_482_240, 335_141_888, 116_534_784)
    assert (d["gpt2-xl_params"], d["gpt3-175b_params"]) == (1_557_611_200, 174_604_259_328)
    assert all(v == 1.0 for k, v in d.items() if k.endswith("_built_equals_analytic"))
    assert "174,604,259,328" in " ".join(c.nanomm for c in chapter.claims)
    assert chapter.plots and all(p.exists() for p in chapter.plots)
