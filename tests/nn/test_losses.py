"""BCE, InfoNCE and the CLIP loss against torch.nn.functional, and the notes' versions where they break."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.nn.losses import CLIP_LOGIT_SCALE_INIT, bce, bce_with_logits, clip_loss, info_nce, logsumexp

# float64 everywhere the reference is exact arithmetic: a handful of logs/exps and one mean, each a
# few ulp (2^-52 ≈ 2.2e-16) of O(1..10) values
F64 = dict(rtol=1e-12, atol=1e-12)
REDUCTIONS = ["mean", "sum", "none"]


def notes_info_nce_loss(query, keys, temperature=0.07):
    """The notes' numpy InfoNCE (§12), transcribed line for line."""
    sim = query @ keys.T / temperature
    labels = np.arange(len(query))
    log_softmax = sim - np.log(np.sum(np.exp(sim), axis=1, keepdims=True))
    return -np.mean(log_softmax[np.arange(len(query)), labels])


# ----------------------------------------------------------------------------- BCE


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_matches_torch_inside_the_clip_range(reduction):
    torch.manual_seed(0)
    p = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    y = torch.rand(64, dtype=torch.float64)  # soft labels too
    torch.testing.assert_close(bce(p, y, reduction=reduction),
                               F.binary_cross_entropy(p, y, reduction=reduction), **F64)


def test_bce_clips_probabilities_at_eps():
    p, y = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    expected = torch.full((2,), -math.log(1e-7), dtype=torch.float64)
    # 1 − (1 − 1e-7) cancels 7 of float64's 16 digits, so the second entry is good to ~1e-9 relative
    torch.testing.assert_close(bce(p, y, reduction="none"), expected, rtol=1e-9, atol=0)


def test_bce_clip_fails_in_float16_as_the_notes_snippet_does():
    # 1 − 1e-7 is 1.0 in float16 (spacing below 1 is 2^-11), so clipping leaves p = 1 and log(1 − p) = −inf
    assert torch.tensor(1 - 1e-7, dtype=torch.float16).item() == 1.0
    p = torch.tensor([1.0, 0.5], dtype=torch.float16)
    assert torch.isinf(bce(p, torch.tensor([0.0, 1.0], dtype=torch.float16)))
    # even a confident *correct* prediction breaks: (1 − y)·log(1 − p) = 0·(−inf) = NaN
    assert torch.isnan(bce(p, torch.tensor([1.0, 1.0], dtype=torch.float16)))
    assert torch.isfinite(bce(p.float(), torch.tensor([0.0, 1.0])))  # float32 represents 1 − 1e-7


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bce_with_logits_matches_torch(reduction, dtype):
    torch.manual_seed(0)
    z = torch.cat([torch.randn(60, dtype=dtype) * 5, torch.tensor([-800.0, -40.0, 40.0, 800.0], dtype=dtype)])
    y = torch.rand(64, dtype=dtype)
    tol = F64 if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)  # float32: ulps of values up to ~800
    torch.testing.assert_close(bce_with_logits(z, y, reduction=reduction),
                               F.binary_cross_entropy_with_logits(z, y, reduction=reduction), **tol)


@pytest.mark.parametrize("z", [1e2, 1e4, 6e4, -1e4, -6e4])
@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_bce_with_logits_stays_finite_in_float16(z, y):
    logits = torch.full((16,), z, dtype=torch.float16)
    target = torch.full((16,), y, dtype=torch.float16)
    loss = bce_with_logits(logits, target)
    truth = F.binary_cross_entropy_with_logits(logits.double(), target.double())
    assert torch.isfinite(loss)
    # each term is computed in float16: the products z·y carry float16's 2^-11 relative rounding
    torch.testing.assert_close(loss.double(), truth, rtol=2e-3, atol=1e-3)


def test_bce_gradients_match_torch():
    torch.manual_seed(0)
    z = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = torch.rand(10, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(bce_with_logits(z, y), z)
    (g_ref,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(z, y), z)
    torch.testing.assert_close(g_ours, g_ref, **F64)


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_keys", [6, 10])
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_info_nce_is_cross_entropy_on_similarity_logits(normalize, n_keys, temperature):
    torch.manual_seed(0)
    q, k = torch.randn(6, 16, dtype=torch.float64), torch.randn(n_keys, 16, dtype=torch.float64)
    qq, kk = (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if normalize else (q, k)
    expected = F.cross_entropy(qq @ kk.T / temperature, torch.arange(6))
    torch.testing.assert_close(info_nce(q, k, temperature=temperature, normalize=normalize), expected, **F64)


def test_symmetric_info_nce_averages_both_directions():
    torch.manual_seed(0)
    q, k = torch.randn(2, 8, 16, dtype=torch.float64)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.07
    expected = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    torch.testing.assert_close(info_nce(q, k, symmetric=True), expected, **F64)
    assert not torch.isclose(info_nce(q, k), expected)  # one direction alone is a different number


def test_info_nce_gradients_match_cross_entropy():
    torch.manual_seed(0)
    q = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(info_nce(q, k, normalize=False, temperature=0.5), [q, k])
    ref = torch.autograd.grad(F.cross_entropy(q @ k.T / 0.5, torch.arange(5)), [q, k])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e2), (torch.float64, 1e3), (torch.float64, 1e4)])
def test_info_nce_finite_where_the_notes_version_overflows(dtype, magnitude):
    torch.manual_seed(0)
    q = torch.randn(8, 4, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(magnitude)  # logits q·k up to `magnitude`
    k = q.flip(0)  # positives are not the largest entries: the loss is large but finite
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        notes = notes_info_nce_loss(q.numpy(), k.numpy(), temperature=1.0)
    ours = info_nce(q, k, temperature=1.0, normalize=False)
    assert not np.isfinite(notes)  # e^s overflows past s ≈ 88 in float32, 709 in float64
    assert torch.isfinite(ours)
    # the loss is O(magnitude); relative error a few ulp of the dtype
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(ours, F.cross_entropy(q @ k.T, torch.arange(8)), **tol)


def test_info_nce_agrees_with_the_notes_version_where_that_one_is_finite():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(info_nce(q, k, normalize=False),
                               torch.tensor(notes_info_nce_loss(q.numpy(), k.numpy()), dtype=torch.float64), **F64)


@given(st.floats(1e-2, 1e2), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_cosine_info_nce_ignores_embedding_length_and_dot_product_does_not(c, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(info_nce(c * q, k), info_nce(q, k), rtol=1e-10, atol=1e-10)
    if abs(math.log(c)) > 0.1:
        assert not torch.isclose(info_nce(c * q, k, normalize=False), info_nce(q, k, normalize=False))


def test_logsumexp_matches_torch_and_survives_infinities():
    x = torch.tensor([[1e4, 0.0, -1e4], [-math.inf, -math.inf, -math.inf], [3.0, -math.inf, 1.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1), **F64)


# ----------------------------------------------------------------------------- CLIP


def test_clip_loss_is_symmetric_cross_entropy_on_scaled_cosines():
    torch.manual_seed(0)
    img, txt = torch.randn(2, 8, 32, dtype=torch.float64)
    t = torch.tensor(CLIP_LOGIT_SCALE_INIT, dtype=torch.float64)
    logits = t.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    torch.testing.assert_close(clip_loss(img, txt, t), expected, **F64)
    torch.testing.assert_close(clip_loss(img, txt, t), info_nce(img, txt, temperature=0.07, symmetric=True), **F64)


def test_clip_logit_scale_is_clamped_at_100_with_no_gradient_past_it():
    torch.manual_seed(0)
    img, txt = torch.randn(2, 4, 8, dtype=torch.float64)
    above = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    below = torch.tensor(math.log(50.0), dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(clip_loss(img, txt, above), clip_loss(img, txt, math.log(100.0)), **F64)
    (g_above,) = torch.autograd.grad(clip_loss(img, txt, above), above)
    (g_below,) = torch.autograd.grad(clip_loss(img, txt, below), below)
    assert g_above == 0 and g_below != 0


# ----------------------------------------------------------------------------- input validation

BAD_INPUTS = [
    (lambda: bce(torch.rand(3), torch.rand(4)), ValueError, r"target: expected the shape of probs \(3,\), got \(4,\)"),
    (lambda: bce(torch.tensor([1.5]), torch.ones(1)), ValueError, r"probs: expected values in \[0, 1\], got min 1.5"),
    (lambda: bce(torch.rand(3), torch.rand(3), reduction="avg"), ValueError, r"reduction: expected one of .*'avg'"),
    (lambda: bce(torch.rand(3), torch.rand(3), eps=0.0), ValueError, r"eps: expected 0 < eps < 0.5, got 0.0"),
    (lambda: bce_with_logits(torch.ones(2, dtype=torch.long), torch.ones(2)), TypeError,
     r"logits: expected a floating dtype, got torch.int64"),
    (lambda: bce_with_logits([0.0], torch.ones(1)), TypeError, r"logits: expected a torch.Tensor, got list"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 6)), ValueError,
     r"keys: expected \(N, D\) with D=8 like query \(4, 8\), got \(4, 6\)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(3, 8)), ValueError, r"keys: expected at least 4 rows.*\(3, 8\)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(6, 8), symmetric=True), ValueError,
     r"keys: expected 4 rows like query.*\(6, 8\)"),
    (lambda: info_nce(torch.randn(2, 4, 8), torch.randn(4, 8)), ValueError, r"query: expected a 2-D float tensor.*\(2, 4, 8\)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0), ValueError,
     r"temperature: expected a positive number, got 0.0"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(5, 8), 1.0), ValueError, r"text_emb: expected 4 rows like image_emb"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), ValueError,
     r"logit_scale: expected a single value, got shape \(2,\)"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), "2.6"), TypeError, r"logit_scale: expected a 0-d tensor or a float, got str"),
]


@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_is_named_in_the_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
