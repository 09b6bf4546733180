"""Chapter 9 (BLIP-2): frozen vs trainable counts, two stages not three, 188M explained."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch09_blip2 as ch09


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    yield ch09.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch09.ID, ch09.TITLE) == (9, "BLIP-2")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds", "wrong", "approx"]


def test_counts(chapter):
    d = chapter.demo
    assert all(math.isfinite(v) for v in d.values())
    assert d["qformer"] == 186_307_387
    assert d["generative_trainable"] == 107_133_696
    assert d["representation_trainable"] > d["qformer"]  # + ITC/ITM heads and ln_vision
    assert d["vit"] + d["lm"] > 3.6e9


def test_frozen_parts_do_not_move(chapter):
    d = chapter.demo
    for stage in ("representation", "generative"):
        assert d[f"{stage}_max_change_vision"] == 0.0
        assert d[f"{stage}_max_change_lm"] == 0.0
        assert d[f"{stage}_max_change_qformer"] > 0.0
    assert chapter.plots and all(p.exists() for p in chapter.plots)
