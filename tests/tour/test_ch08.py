"""Chapter 8 runs quickly, verifies CLIP's loss and temperature from nanomm's code, and trains a demo CLIP."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch08_clip as ch08


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch08.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch08.ID, ch08.TITLE) == (8, "CLIP")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds"] * 6


def test_loss_is_symmetric_on_cosines(chapter):
    d = chapter.demo
    assert d["symmetric_loss_error"] < 1e-5  # float32 cross-entropies of 16 rows
    assert d["loss_i2t"] != d["loss_t2i"]
    assert d["cosine_rescale_change"] < 1e-5 and d["embedding_norm_error"] < 1e-5


def test_temperature(chapter):
    d = chapter.demo
    assert d["tau_init"] == pytest.approx(0.07, rel=1e-6)
    assert d["logit_scale_grad_init"] != 0.0
    assert d["clipped_scale"] == 100.0 and d["clipped_scale_grad"] == 0.0
    assert d["clip_b32_embedding_dim"] == 512


def test_demo_learns(chapter):
    d = chapter.demo
    assert d["final_loss"] < d["first_loss"]
    assert d["seen_zero_shot_accuracy"] > 2 * d["seen_zero_shot_chance"]
    assert d["similarity_diagonal_mean"] > d["similarity_off_diagonal_mean"]  # matching pairs are closer
    assert all(math.isfinite(v) for v in d.values())


def test_outputs(chapter):
    assert chapter.plots and all(p.exists() and p.stat().st_size > 0 for p in chapter.plots)
    table = [line for line in chapter.lines if line.startswith("| ")]
    assert len(table) == 1 + 4  # header and four held-out images
