"""Chapter 14 in quick mode: which ops stay fp32 and why, and fp16/bf16 training against fp32."""

import math
from pathlib import Path

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch14_mixed_precision as ch14
from nanomm.train.precision import FP32_POLICY


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch14.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


EXPECTED = {
    "forward/backward in FP16, weights stored and updated in FP32": "holds",
    "softmax must stay FP32 (exp overflows)": "holds",
    "LayerNorm must stay FP32 (precision-sensitive)": "holds",
    "the loss must stay FP32": "holds",
    "memory −50%": "approx",
    "2–3× faster (Tensor Cores)": "unverifiable",
    "almost no loss of accuracy": "holds",
}


def test_identity():
    assert ch14.ID == 14 and ch14.TITLE == "Mixed precision"


def test_verdicts(chapter):
    assert {c.claim: c.verdict for c in chapter.claims} == EXPECTED
    first = chapter.claims[0].nanomm
    assert "working weights torch.float16" in first and "masters torch.float32" in first
    assert "AdamW state torch.float32" in first


def test_the_chapter_lists_the_policy_and_torchs_cpu_list(chapter):
    policy_line, torch_line = chapter.lines[:2]
    assert all(op in policy_line for op in FP32_POLICY)
    assert "fp32 for cross_entropy" in torch_line  # losses are on torch's CPU fp32 list


def test_torch_cpu_autocast_probe():
    lists = ch14.torch_cpu_autocast()
    assert {"cross_entropy", "nll_loss", "mse_loss"} <= set(lists["fp32"])
    assert "linear" in lists["lower"]
    assert "softmax" in lists["as_input"]  # on CPU torch leaves softmax to the kernel's internal fp32


def test_why_fp32(chapter):
    d = chapter.demo
    assert d["softmax_fp16_naive_rows_nonfinite"] > 0.5  # e^x overflows fp16 past 11.09
    assert d["layernorm_rms8_fp16_acc_err"] > 0.5 > 1e-3 > d["layernorm_rms8_policy_err"]
    assert d["loss_mean_16384_tokens_fp16_acc_overflow"] == 1.0 and d["loss_mean_16384_tokens_policy_err"] < 1e-6
    assert d["loss_mean_2048_tokens_fp16_acc_err"] > 1e2 * d["loss_mean_2048_tokens_policy_err"]
    assert all(math.isfinite(v) for v in d.values())  # the report is strict JSON


def test_training_matches(chapter):
    d = chapter.demo
    # same batches, same init: fp16 rounds at 2^-11, bf16 at 2^-8 relative, on losses near 2.9
    assert d["max_loss_gap_fp16"] < 1e-2 and d["max_loss_gap_bf16"] < 5e-2
    assert d["final_loss_fp32"] < 2.8  # it does learn in 30 steps (ln 16 = 2.77 is chance)
    (plot,) = chapter.plots
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
