"""Chapter 17 in quick mode: the memory table against the notes' figures, and a real 2-process ZeRO-1 run."""

from pathlib import Path

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch17_zero as ch17


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch17.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


EXPECTED = {
    "10B parameters × 16 bytes = 160 GB of model states, more than one GPU holds": "holds",
    "ZeRO-1 cuts per-device memory 4×": "approx",
    "ZeRO-2 cuts per-device memory 8×": "approx",
    "ZeRO-3 divides memory by N, at the price of more communication": "holds",
    "full fine-tuning a 7B model needs 112 GB (16 B/param, before activations)": "approx",
    "launch with `deepspeed train.py --deepspeed ds_config.json`; config train_batch_size 32, "
    "gradient_accumulation_steps 4, fp16, ZeRO stage 2": "approx",
    "activation checkpointing saves (activation) memory": "holds",
}


def test_identity():
    assert ch17.ID == 17 and ch17.TITLE == "DeepSpeed and ZeRO"


def test_verdicts(chapter):
    assert {c.claim: c.verdict for c in chapter.claims} == EXPECTED
    by_claim = {c.claim: c.nanomm for c in chapter.claims}
    assert "2.91× at N_d=8" in by_claim["ZeRO-1 cuts per-device memory 4×"]
    assert "4.27× at N_d=8" in by_claim["ZeRO-2 cuts per-device memory 8×"]
    assert "107.8 GB" in by_claim["full fine-tuning a 7B model needs 112 GB (16 B/param, before activations)"]


def test_the_zero_paper_example(chapter):
    got = [round(chapter.demo[f"paper_7_5b_stage{s}_gb"], 1) for s in range(4)]
    assert got == [ch17.PAPER_7_5B[s] for s in range(4)]


def test_the_notes_config_fits_only_some_world_sizes(chapter):
    assert {k: v for k, v in chapter.demo.items() if k.startswith("notes_config")} == {
        "notes_config_micro_batch_on_1": 8.0, "notes_config_micro_batch_on_2": 4.0,
        "notes_config_micro_batch_on_4": 2.0, "notes_config_micro_batch_on_8": 1.0}


def test_live_zero1_ranks_hold_half_the_optimizer(chapter):
    d = chapter.demo
    for rank in (0, 1):
        # ZeroRedundancyOptimizer hands out whole tensors, so a rank is off its 1/N by at most one tensor's
        # state; the step counters add 4 bytes per tensor
        assert d[f"zero1_rank{rank}_vs_prediction"] == pytest.approx(1.0, abs=0.1)
        assert d[f"zero1_rank{rank}_vs_unsharded"] == pytest.approx(0.5, abs=0.05)
    total = d["zero1_rank0_optimizer_bytes"] + d["zero1_rank1_optimizer_bytes"]
    assert total == pytest.approx(2 * d["zero1_predicted_optimizer_bytes"], rel=0.01)  # nothing lost or doubled


def test_checkpointing_matches_its_formula(chapter):
    d = chapter.demo
    assert d["activations_checkpoint_bytes"] == d["activations_checkpoint_predicted_bytes"]
    assert d["activation_saving"] > 5


def test_plot(chapter):
    (plot,) = chapter.plots
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
