"""The position-wise feed-forward block: a GELU/ReLU MLP, and LLaMA's SwiGLU.

  MLP      y = W_out · act(W_in x + b_in) + b_out                    (Vaswani et al., 2017, §3.3)
  SwiGLU   y = W_down · (silu(W_gate x) ⊙ W_up x),  silu(z) = z·σ(z)  (Shazeer, 2020, "GLU Variants")

Activations (Hendrycks & Gimpel, 2016, for GELU):
  gelu       z · Φ(z) = ½ z (1 + erf(z/√2))                          BERT, ViT
  gelu_tanh  ½ z (1 + tanh(√(2/π) (z + 0.044715 z³)))                 GPT-2's approximation
  relu       max(z, 0)                                                the original Transformer
  quick_gelu z · σ(1.702 z)                                           OpenAI's CLIP checkpoints

SwiGLU has three matrices instead of two; LLaMA sizes the hidden width at about 2/3 · 4d so the
parameter count stays that of a 4d MLP (11008 for d = 4096).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gelu", "gelu_tanh", "relu", "silu", "quick_gelu", "ACTIVATIONS", "FORMULAS", "MLP", "SwiGLU"]


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def relu(x: Tensor) -> Tensor:
    return x.clamp_min(0)


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# The formulas above define the functions (and the tests check against them); the layers run torch's
# fused kernels for the same functions: one pass over memory instead of five, and no saved intermediates.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": quick_gelu,  # no fused kernel in torch; the formula is the layer
}
FORMULAS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu, "silu": silu,
                                                   "quick_gelu": quick_gelu}


def _check_widths(dim: int, hidden: int) -> None:
    for name, v in (("dim", dim), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _check_input(x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x: expected (..., {dim}), got {tuple(x.shape)}")


class MLP(nn.Module):
    """fc_in → activation → fc_out, the activation picked by name from ACTIVATIONS."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "gelu", bias: bool = True):
        super().__init__()
        _check_widths(dim, hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.dim, self.activation = dim, activation
        self.act = ACTIVATIONS[activation]
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        return self.fc_out(self.act(self.fc_in(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP, no biases in LLaMA."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False):
        super().__init__()
        _check_widths(dim, hidden)
        self.dim = dim
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
