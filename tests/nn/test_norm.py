"""LayerNorm and RMSNorm against torch, Hugging Face's LlamaRMSNorm and the RMSNorm paper's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.nn.norm import LayerNorm, RMSNorm

# float32: the mean and variance are sums of `dim` terms taken in a different order than torch's
# kernel; the relative error of such a sum is a few ulp (2^-23 ≈ 1.2e-7) times log2(dim), so 2e-6
# on O(1) outputs. float64: the same argument at 2^-52.
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = [(5, 8), (2, 3, 64), (1, 768)]


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("dtype", sorted(TOL, key=str))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps,bias", [(1e-5, True), (1e-12, True), (1e-5, False)])
def test_layer_norm_matches_torch(dtype, shape, eps, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    ln = _randomise(LayerNorm(shape[-1], eps=eps, bias=bias)).to(dtype)
    expected = F.layer_norm(x, shape[-1:], ln.weight, ln.bias, eps)
    torch.testing.assert_close(ln(x), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", sorted(TOL, key=str))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_rms_norm_matches_torch_with_eps_inside(dtype, shape, eps):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 2
    ours = _randomise(RMSNorm(shape[-1], eps=eps)).to(dtype)
    ref = torch.nn.RMSNorm(shape[-1], eps=eps, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), **TOL[dtype])


def test_rms_norm_matches_transformers_llama_in_bfloat16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 32).to(torch.bfloat16)
    ours, hf = _randomise(RMSNorm(32)), LlamaRMSNorm(32)
    hf.load_state_dict(ours.state_dict())
    ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    # a bf16 model: float32 statistics, one cast to bf16, one bf16 multiply by the weight, in the
    # same order on both sides, so the results are bit for bit the same
    assert torch.equal(ours(x), hf(x))


def test_eps_outside_is_the_paper_formula():
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-3, eps_inside=False).double()
    expected = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-3)
    torch.testing.assert_close(norm(x), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scale,differ", [(1e-3, True), (10.0, False)])
def test_eps_conventions_differ_only_when_mean_square_is_near_eps(scale, differ):
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.float64) * scale
    gap = (RMSNorm(64, eps_inside=True).double()(x) - RMSNorm(64, eps_inside=False).double()(x)).abs().max()
    # mean(x²) = 1e-6 = eps: sqrt(ms + eps) = 1.41e-3 vs sqrt(ms) + eps = 1.001e-3, outputs O(1) apart;
    # at mean(x²) = 100 the scales differ by about eps/sqrt(ms) = 1e-7 relative, on outputs below ~5
    assert (gap > 0.1) if differ else (gap < 1e-6)


@given(st.integers(2, 48), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_rms_norm_equals_layer_norm_without_bias_on_zero_mean_input(dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, dim, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)  # zero mean: variance and mean square coincide
    ln, rms = LayerNorm(dim, eps=1e-6, bias=False).double(), RMSNorm(dim, eps=1e-6).double()
    torch.testing.assert_close(rms(x), ln(x), rtol=1e-10, atol=1e-10)  # float64, the mean ≈ 1e-17 rounding


@given(st.floats(1e-3, 1e3), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_rms_norm_is_scale_invariant_without_eps(c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, generator=g, dtype=torch.float64)
    norm = RMSNorm(16, eps=0.0).double()
    torch.testing.assert_close(norm(c * x), norm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,ref", [
    (lambda: LayerNorm(6), lambda x, m: F.layer_norm(x, (6,), m.weight, m.bias, 1e-5)),
    (lambda: RMSNorm(6), lambda x, m: F.rms_norm(x, (6,), m.weight, 1e-6)),
])
def test_gradients_match_torch(make, ref):
    torch.manual_seed(0)
    m = _randomise(make()).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(4, 6, dtype=torch.float64)
    ours = torch.autograd.grad(m(x), [x, *m.parameters()], g_out)
    theirs = torch.autograd.grad(ref(x, m), [x, *m.parameters()], g_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # float64, same derivative


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda: LayerNorm(64), lambda: RMSNorm(64)])
def test_half_precision_input_uses_float32_statistics(dtype, make):
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * 100).to(dtype)  # x² overflows float16 (> 65504) if squared in float16
    m = make()
    out = m(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # one rounding of an O(1) value to dtype after float32 statistics
    torch.testing.assert_close(out.float(), m(x.float()), rtol=torch.finfo(dtype).eps, atol=1e-3)


def test_parameter_counts():
    assert sum(p.numel() for p in LayerNorm(768).parameters()) == 2 * 768
    assert sum(p.numel() for p in LayerNorm(768, bias=False).parameters()) == 768
    assert sum(p.numel() for p in RMSNorm(768).parameters()) == 768


BAD_INPUTS = [
    (lambda: LayerNorm(0), ValueError, r"dim: expected a positive int, got 0"),
    (lambda: RMSNorm(8, eps=-1.0), ValueError, r"eps: expected a number >= 0, got -1.0"),
    (lambda: RMSNorm(8, eps_inside="yes"), TypeError, r"eps_inside: expected a bool, got str"),
    (lambda: RMSNorm(8)(torch.randn(2, 6)), ValueError, r"x: expected \(\.\.\., 8\), got \(2, 6\)"),
    (lambda: LayerNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, r"x: expected a floating dtype, got torch.int64"),
    (lambda: LayerNorm(8)([1.0] * 8), TypeError, r"x: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_is_named_in_the_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
