"""Chapter 1 (DPO): the loss is the notes' formula and trl's, log 2 at the start, a live run learns the
ranking, and the reward curves are plotted."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch01_dpo as ch01


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch01.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch01.ID, ch01.TITLE) == (1, "DPO")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds", "holds", "approx", "approx", "holds", "unverifiable"]
    assert all(c.source and c.nanomm for c in chapter.claims)


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())


def test_loss_is_the_notes_formula_and_trls_and_starts_at_log2(chapter):
    d = chapter.demo
    assert d["nanomm_vs_trl_sigmoid"] < 1e-12 and d["nanomm_vs_notes_formula"] < 1e-12  # float64
    assert d["loss_at_reference_random"] == pytest.approx(math.log(2), abs=1e-12)
    # the live model at step 0: LoRA's B = 0 makes policy and reference the same function (float32 sums)
    assert d["loss_at_step0_live"] == pytest.approx(math.log(2), abs=1e-5)


def test_live_run_learns_the_ranking(chapter):
    d = chapter.demo
    assert d["heldout_rewards/accuracies"] > 0.5 and d["heldout_rewards/margins"] > 0
    assert d["heldout_loss"] < math.log(2)


def test_training_samples_nothing_and_reuses_one_model_as_reference(chapter):
    assert chapter.demo["decoding_steps_in_training"] == 0 and chapter.demo["forwards_per_step"] == 2


def test_beta_weighs_the_kl_penalty(chapter):
    d = chapter.demo
    kls = [d[f"optimum_kl_beta_{b}"] for b in (0.1, 0.5, 1.0, 5.0)]
    assert kls == sorted(kls, reverse=True)  # larger β, optimum closer to π_ref


def test_reward_curves_are_plotted(chapter):
    assert len(chapter.plots) == 1 and chapter.plots[0].name == "ch01_dpo_rewards.png"
    assert chapter.plots[0].stat().st_size > 1000
