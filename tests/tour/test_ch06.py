"""Chapter 6 (Q-Former): 257 → 32 tokens, the LAVIS size, and only ITC contrastive."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch06_qformer as ch06


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    yield ch06.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch06.ID, ch06.TITLE) == (6, "Q-Former")


def test_verdicts(chapter):
    # compression holds; the structure omits the every-other-layer cross-attention and per-objective masks;
    # "three contrastive tasks" is wrong: only ITC is contrastive
    assert [c.verdict for c in chapter.claims] == ["holds", "approx", "wrong"]


def test_figures(chapter):
    d = chapter.demo
    assert all(math.isfinite(v) for v in d.values())
    assert (d["vit_tokens"], d["query_tokens"], d["query_width"]) == (257, 32, 768)
    assert d["qformer_params"] == 186_307_387
    assert d["cross_attention_layers"] == 6
    assert (d["itm_classes"], d["itc_logits_cols"]) == (2, 4)  # binary ITM vs a batch-wide ITC softmax
    assert d["query_change_when_text_changes_unimodal"] == 0.0
    assert d["query_change_when_text_changes_multimodal_causal"] == 0.0
    assert d["query_change_when_text_changes_bidirectional"] > 1e-4
    assert "186,307,387" in chapter.claims[1].nanomm
    assert chapter.plots and all(p.exists() for p in chapter.plots)
