"""Chapter 11 (LLaMA vs LLaVA): LLaMA's sizes, LLaVA's projectors, stages and image tokens."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch11_llama_llava as ch11


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    yield ch11.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch11.ID, ch11.TITLE) == (11, "LLaMA vs LLaVA")


def test_verdicts(chapter):
    # LLaMA: both hold. LLaVA: Vicuna not LLaMA (approx), linear only in v1 (approx), stage 1 holds,
    # stage 2 also trains the projector (approx), 32 vs 256+ tokens holds
    assert [c.verdict for c in chapter.claims] == ["holds", "holds", "approx", "approx", "holds", "approx", "holds"]


def test_counts(chapter):
    d = chapter.demo
    assert all(math.isfinite(v) for v in d.values())
    assert d["llama_7B_params"] == 6_738_415_616
    assert d["llava-1.5-7b_total"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert (d["llava-7b_projector"], d["llava-1.5-7b_projector"]) == (4_198_400, 20_979_712)
    assert d["llava-7b_pretrain"] == d["llava-7b_projector"]
    assert d["llava-7b_finetune"] == d["llava-7b_lm"] + d["llava-7b_projector"]
    assert (d["llava-7b_tokens"], d["llava-1.5-7b_tokens"]) == (256, 576)


def test_projector_demo_learns(chapter):
    d = chapter.demo
    for name in ("linear", "mlp2x_gelu"):
        assert d[f"stage1_{name}_last_loss"] < d[f"stage1_{name}_first_loss"]
    assert chapter.plots and all(p.exists() for p in chapter.plots)
