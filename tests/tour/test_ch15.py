"""Chapter 15 runs quickly; the KV cache changes nothing but time and costs what the formula says
(timings are reported, never asserted)."""

from __future__ import annotations

import math

import pytest

from nanomm.tour.chapter import TourContext
from nanomm.tour.chapters import ch15_decoder_only as ch15


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    return ch15.run(TourContext(out=tmp_path_factory.mktemp("tour"), quick=True))


def test_identity():
    assert (ch15.ID, ch15.TITLE) == (15, "Why decoder-only; the KV cache")


def test_verdicts(chapter):
    assert [c.verdict for c in chapter.claims] == ["holds"] * 4 + ["unverifiable"] * 3
    assert all(c.source for c in chapter.claims)


def test_demo_is_json_safe(chapter):
    assert all(math.isfinite(v) for v in chapter.demo.values())


def test_cache_is_exact_and_its_memory_matches_the_formula(chapter):
    d = chapter.demo
    # float32: two summation orders of O(1) logits agree to ~1e-6; float64 to ~1e-15
    assert d["cached_vs_uncached_max_logit_diff_f32"] < 1e-4
    assert d["cached_vs_uncached_max_logit_diff_f64"] < 1e-10
    assert d["training_forward_vs_generation_max_diff_f64"] < 1e-10
    # LLaMA-7B fp16: 2 · 32 layers · 32 heads · 128 dims · 2 bytes; 2048 tokens make 1 GiB; GQA-8 is 4× smaller
    assert d["kv_bytes_per_token_llama7b_fp16"] == 524_288
    assert d["kv_gib_llama7b_2048_tokens"] == 1.0
    assert d["kv_bytes_per_token_llama7b_gqa8_fp16"] == 524_288 / 4
    # llama-tiny float32: 2 · 4 layers · 2 kv heads · 32 dims · 4 bytes, measured on the KVCache itself
    assert d["kv_bytes_per_token_tiny_measured"] == d["kv_bytes_per_token_tiny_formula"] == 2048
    assert (d["loss_positions_causal_lm_of_128"], d["loss_positions_mlm_of_128"]) == (127, 19)


def test_speedups_are_reported_per_length_and_plotted(chapter):
    assert {k for k in chapter.demo if k.startswith("cache_speedup_")} == {
        "cache_speedup_16_tokens", "cache_speedup_32_tokens"}
    assert all(v > 0 for k, v in chapter.demo.items() if k.startswith("cache_speedup_"))
    assert chapter.plots and all(p.exists() and p.stat().st_size > 0 for p in chapter.plots)
