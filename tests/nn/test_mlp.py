"""Activations and feed-forward blocks against torch.nn.functional and Hugging Face's LlamaMLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanomm.nn.mlp import ACTIVATIONS, MLP, SwiGLU

REFERENCES = {
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP; tests/models/test_vit.py checks transformers
}
# float32: each side is a handful of elementwise ops on the same input; torch's fused kernels may
# round each step differently, a few ulp (1.2e-7) of O(|x|) values. float64: the same at 2^-52.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}


def test_every_activation_has_a_reference():
    assert set(ACTIVATIONS) == set(REFERENCES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_matches_torch(name, dtype):
    x = torch.linspace(-12, 12, 2001, dtype=dtype)
    torch.testing.assert_close(ACTIVATIONS[name](x), REFERENCES[name](x), **TOL[dtype])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_fused_kernels_compute_the_written_formula(name):
    from nanomm.nn.mlp import FORMULAS

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](x), FORMULAS[name](x), **TOL[torch.float64])
    torch.testing.assert_close(FORMULAS[name](x), REFERENCES[name](x), **TOL[torch.float64])


def test_gelu_variants_differ_by_the_tanh_approximation():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    gap = (ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_tanh"](x)).abs().max()
    assert 1e-5 < gap < 1e-3  # Hendrycks & Gimpel's approximation is good to ~5e-4, but not exact


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_is_fc_out_of_activation_of_fc_in(activation, bias):
    torch.manual_seed(0)
    mlp = MLP(16, 64, activation=activation, bias=bias).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = mlp.fc_out(REFERENCES[activation](mlp.fc_in(x)))
    torch.testing.assert_close(mlp(x), expected, **TOL[torch.float64])
    assert sum(p.numel() for p in mlp.parameters()) == 2 * 16 * 64 + (64 + 16) * bias


def test_swiglu_matches_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu", mlp_bias=False)
    hf = LlamaMLP(cfg).double()
    ours = SwiGLU(32, 88).double()
    ours.load_state_dict(hf.state_dict())  # the same three names: gate_proj, up_proj, down_proj
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), hf(x), **TOL[torch.float64])
    assert sum(p.numel() for p in ours.parameters()) == 3 * 32 * 88


def test_swiglu_gradients_match_the_reference_formula():
    torch.manual_seed(0)
    m = SwiGLU(8, 12, bias=True).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(m(x), [x, *m.parameters()], g),
                    torch.autograd.grad(ref, [x, *m.parameters()], g)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


BAD_INPUTS = [
    (lambda: MLP(8, 32, activation="swish"), ValueError, r"activation: expected one of .*'swish'"),
    (lambda: MLP(0, 32), ValueError, r"dim: expected a positive int, got 0"),
    (lambda: SwiGLU(8, -1), ValueError, r"hidden: expected a positive int, got -1"),
    (lambda: MLP(8, 32)(torch.randn(2, 7)), ValueError, r"x: expected \(\.\.\., 8\), got \(2, 7\)"),
    (lambda: SwiGLU(8, 32)(torch.randn(3, 9)), ValueError, r"x: expected \(\.\.\., 8\), got \(3, 9\)"),
]


@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_is_named_in_the_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
