"""Chapter 18 (PEFT): five methods on one tiny LLaMA, the 7B memory arithmetic, where IA3 and adapters sit
(timings are reported, never asserted)."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch18_peft as ch18

METHODS = ("none", "lora", "prefix", "adapter", "ia3")


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch18.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch18.ID, ch18.TITLE) == (18, "PEFT: LoRA, prefix, adapter, IA3")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["approx", "approx", "holds", "approx", "approx", "holds",
                                                  "unverifiable"]
    assert all(c.source and c.nanomm for c in chapter.claims)


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())


def test_seven_b_full_finetune_is_16_bytes_per_parameter(chapter):
    d = chapter.demo
    assert d["llama7b_full_finetune_gb"] == pytest.approx(16 * 6_738_415_616 / 1e9)  # 107.8 GB, not 112
    assert d["llama7b_lora_qv_gb"] < d["llama7b_full_finetune_gb"] / 3


def test_every_method_is_measured_and_the_shares_order_as_expected(chapter):
    d = chapter.demo
    for m in METHODS:
        assert d[f"{m}_peak_step_bytes"] > 0 and d[f"{m}_unmerged_time_ratio"] > 0 and d[f"{m}_val_loss"] > 0
    shares = [d[f"{m}_trainable_percent"] for m in ("ia3", "prefix", "adapter", "lora", "none")]
    assert shares == sorted(shares) and shares[-1] == 100.0
    # full fine-tuning allocates gradients and Adam moments for every weight on its first step
    assert d["none_peak_step_bytes"] > max(d[f"{m}_peak_step_bytes"] for m in ("prefix", "adapter"))


def test_merged_lora_and_ia3_are_plain_models(chapter):
    d = chapter.demo
    assert d["lora_merged_extra_params"] == 0.0 and d["ia3_merged_extra_params"] == 0.0
    assert "prefix_merged_time_ratio" not in d and "adapter_merged_time_ratio" not in d


def test_ia3_scales_keys_values_and_the_ffn(chapter):
    ia3 = chapter.claims[2].nanomm
    assert all(name in ia3 for name in ("attn.k_proj", "attn.v_proj", "mlp.down_proj"))
    assert "2 per layer" in chapter.claims[3].nanomm  # Houlsby: after attention and after the FFN
