"""Normalisation over the last axis: LayerNorm and RMSNorm.

  LayerNorm   y = (x − mean(x)) / sqrt(var(x) + eps) · γ + β          (Ba et al., 2016)
  RMSNorm     y = x / RMS(x) · γ,   RMS(x) = sqrt(mean(x²))            (Zhang & Sennrich, 2019)

RMSNorm drops the mean subtraction and the bias β: it rescales, it does not re-centre. On inputs of
zero mean the two coincide (without β).

Where eps goes differs between sources, and it matters when mean(x²) is comparable to eps:
  eps_inside=True   x / sqrt(mean(x²) + eps)   torch.nn.RMSNorm, Meta's LLaMA, Hugging Face, the notes
  eps_inside=False  x / (sqrt(mean(x²)) + eps) the RMSNorm paper's reference code (Eq. 4 has no eps)
nanomm defaults to the first, since the checkpoints it loads were trained with it.

Statistics are computed in float32 for half-precision inputs (mixed-precision practice keeps
normalisation in fp32; Micikevicius et al., 2018) and the result is cast back before the affine step,
in the order LLaMA uses.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["LayerNorm", "RMSNorm", "RMS_EPS"]


def _check_dim(dim: int, eps: float) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def _check_input(x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x: expected (..., {dim}), got {tuple(x.shape)}")


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LayerNorm(nn.Module):
    """Centre and scale each vector to zero mean and unit (biased) variance, then γ·y + β."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        _check_dim(dim, eps)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        h = x.to(_work_dtype(x))
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)  # biased, as in the paper and torch
        y = ((h - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        y = y * self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


# eps_inside -> 1 / RMS(x) from mean(x²); the two conventions of the module docstring
RMS_EPS: dict[bool, Callable[[Tensor, float], Tensor]] = {
    True: lambda ms, eps: torch.rsqrt(ms + eps),
    False: lambda ms, eps: 1.0 / (ms.sqrt() + eps),
}


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then γ·y; no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6, eps_inside: bool = True):
        super().__init__()
        _check_dim(dim, eps)
        if not isinstance(eps_inside, bool):
            raise TypeError(f"eps_inside: expected a bool, got {type(eps_inside).__name__}")
        self.dim, self.eps, self.eps_inside = dim, eps, eps_inside
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        h = x.to(_work_dtype(x))
        inv_rms = RMS_EPS[self.eps_inside](h.pow(2).mean(-1, keepdim=True), self.eps)  # (..., 1)
        return (h * inv_rms).to(x.dtype) * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, eps_inside={self.eps_inside}"
