"""Chapter 10 (pretrain vs SFT vs LoRA): each stage measured on one tiny LLaMA."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch10_pretrain_sft_lora as ch10


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch10.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch10.ID, ch10.TITLE) == (10, "Pretrain vs SFT vs LoRA")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds"] * 4 + ["unverifiable"] * 2
    assert all(c.source and c.nanomm for c in chapter.claims)


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())


def test_pretraining_beats_the_unigram_baseline_and_trains_every_tensor(chapter):
    d = chapter.demo
    assert d["pretrain_val_loss"] < d["unigram_val_loss"] < d["pretrain_val_loss_before"]
    assert d["pretrain_changed_tensors"] == 1.0


def test_full_sft_changes_everything_and_lora_nothing_of_the_base(chapter):
    d = chapter.demo
    assert d["sft_full_trainable_percent"] == 100.0 and d["sft_full_changed_tensors"] == 1.0
    assert d["sft_full_val_loss"] < d["sft_full_val_loss_before"]
    assert d["sft_lora_base_max_abs_change"] == 0.0 and d["sft_lora_changed_tensors"] == 0.0
    assert d["sft_lora_val_loss"] < d["sft_lora_val_loss_before"]


def test_lora_identity_merge_and_share(chapter):
    d = chapter.demo
    assert d["lora_init_max_diff"] == 0.0  # B = 0: BA adds exact zeros
    assert d["sft_lora_lora_merge_max_diff"] < 1e-4  # float32 W + (α/r)BA vs two matmuls
    # LLaMA-7B, r = 8 on q and v: 32 layers · 2 · 8 · (4096 + 4096) = 4,194,304 of 6,738,415,616
    assert d["llama7b_lora_qv_r8_trainable_percent"] == pytest.approx(100 * 4_194_304 / 6_742_609_920, rel=1e-9)
