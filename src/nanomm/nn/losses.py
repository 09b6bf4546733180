"""Binary cross-entropy and the contrastive losses (InfoNCE, CLIP).

  BCE          ℓ = −[y log p + (1 − y) log(1 − p)]
  BCE, logits  ℓ = softplus(z) − y·z = max(z, 0) − y·z + log(1 + e^(−|z|)),   p = σ(z)
  InfoNCE      ℓ_i = −log( e^(s_ii/τ) / Σ_j e^(s_ij/τ) ) = logsumexp_j(s_ij/τ) − s_ii/τ
               (van den Oord et al., 2018), s_ij = ⟨q_i, k_j⟩, cosine when both are L2-normalised
  CLIP         ½ (InfoNCE(images → texts) + InfoNCE(texts → images)), logits scaled by e^t with t
               learnable in log space, initialised at log(1/0.07), e^t clipped at 100 (Radford et al., 2021, §2.5)

Numerics, which is where hand-written versions fail:
  * `bce` clips p to [eps, 1 − eps] as the notes do. In float16, 1 − 1e-7 rounds to exactly 1, so a
    confident wrong prediction gives log(0) = −inf: the loss is inf (or NaN with soft labels). Keep
    it for probabilities in float32/64; train on logits with `bce_with_logits`, finite for any z.
  * logsumexp subtracts the row maximum first: e^(s − max) ≤ 1 never overflows, whereas e^s does
    for s > 88 in float32 (709 in float64), which unnormalised embeddings reach easily.
  * reductions accumulate in float32 (float64 for float64 inputs), as torch's do.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["bce", "bce_with_logits", "info_nce", "clip_loss", "logsumexp", "REDUCTIONS",
           "CLIP_LOGIT_SCALE_INIT", "CLIP_MAX_SCALE"]

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature τ = 0.07, stored as log(1/τ)
CLIP_MAX_SCALE = 100.0  # CLIP clips the logit scale at 100 "to prevent training instability"


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda l: l.mean(dtype=_acc_dtype(l)).to(l.dtype),
    "sum": lambda l: l.sum(dtype=_acc_dtype(l)).to(l.dtype),
    "none": lambda l: l,
}


def _check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor, reduction: str) -> None:
    for name, t in ((a_name, a), (b_name, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not a.is_floating_point():
        raise TypeError(f"{a_name}: expected a floating dtype, got {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{b_name}: expected the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {sorted(REDUCTIONS)}, got {reduction!r}")


def bce(probs: Tensor, target: Tensor, *, eps: float = 1e-7, reduction: str = "mean") -> Tensor:
    """BCE from probabilities, clipped to [eps, 1 − eps] in probs' own dtype, as the notes do."""
    _check_pair("probs", probs, "target", target, reduction)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps: expected 0 < eps < 0.5, got {eps!r}")
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"probs: expected values in [0, 1], got min {float(probs.min()):g}, max {float(probs.max()):g}")
    p = probs.clamp(eps, 1 - eps)  # in float16 the upper bound rounds to 1.0: see the module docstring
    y = target.to(probs.dtype)
    return REDUCTIONS[reduction](-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))


def bce_with_logits(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """BCE of σ(logits), computed as max(z, 0) − y·z + log1p(e^(−|z|)): no exp ever exceeds 1."""
    _check_pair("logits", logits, "target", target, reduction)
    y = target.to(logits.dtype)
    loss = logits.clamp_min(0) - logits * y + torch.log1p(torch.exp(-logits.abs()))
    return REDUCTIONS[reduction](loss)


def logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """log Σ e^x along dim, shifted by the maximum so nothing overflows (the max is kept finite)."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all −inf row stays −inf, not NaN
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def _diagonal_ce(logits: Tensor) -> Tensor:
    # cross-entropy with the positive of row i in column i: mean_i logsumexp(row i) − logits[i, i]
    n = logits.shape[0]
    return (logsumexp(logits, -1) - logits[torch.arange(n), torch.arange(n)]).mean()


def _l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # 1e-12 guards the zero vector


def _check_embeddings(a_name: str, a: Tensor, b_name: str, b: Tensor, *, same_rows: bool) -> None:
    for name, t in ((a_name, a), (b_name, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float tensor (N, D), got {t.dtype} {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{b_name}: expected (N, D) with D={a.shape[1]} like {a_name} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{b_name}: expected {a.shape[0]} rows like {a_name} (symmetric loss), got {tuple(b.shape)}")
    if not same_rows and b.shape[0] < a.shape[0]:
        raise ValueError(f"{b_name}: expected at least {a.shape[0]} rows, one positive per {a_name} row, "
                         f"got {tuple(b.shape)}")


def info_nce(query: Tensor, keys: Tensor, *, temperature: float = 0.07, normalize: bool = True,
             symmetric: bool = False) -> Tensor:
    """InfoNCE with the positive of query i at keys[i]; every other key is a negative.

    query (B, D), keys (N, D) with N ≥ B (extra rows are extra negatives). normalize=True makes the
    similarity a cosine, as the notes' "sim = cosine similarity" says. symmetric=True averages both
    directions (needs N == B), which is CLIP's loss. Returned in float32 for half-precision inputs.
    """
    _check_embeddings("query", query, "keys", keys, same_rows=symmetric)
    if not (isinstance(temperature, (int, float, Tensor)) and float(temperature) > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    q, k = query.to(_acc_dtype(query)), keys.to(_acc_dtype(query))
    if normalize:
        q, k = _l2_normalize(q), _l2_normalize(k)
    logits = q @ k.T / temperature  # (B, N)
    if not symmetric:
        return _diagonal_ce(logits)
    return 0.5 * (_diagonal_ce(logits) + _diagonal_ce(logits.T))


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric loss on cosine similarities scaled by min(e^logit_scale, 100).

    logit_scale is the learnable log-space parameter (init CLIP_LOGIT_SCALE_INIT); the clamp stops
    both the scale and its gradient once e^logit_scale reaches 100.
    """
    _check_embeddings("image_emb", image_emb, "text_emb", text_emb, same_rows=True)
    if not isinstance(logit_scale, Tensor):
        if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool):
            raise TypeError(f"logit_scale: expected a 0-d tensor or a float, got {type(logit_scale).__name__}")
        logit_scale = torch.tensor(float(logit_scale))
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale: expected a single value, got shape {tuple(logit_scale.shape)}")
    work = _acc_dtype(image_emb)
    img, txt = _l2_normalize(image_emb.to(work)), _l2_normalize(text_emb.to(work))
    scale = logit_scale.to(work).reshape(()).exp().clamp(max=CLIP_MAX_SCALE)
    logits = scale * img @ txt.T  # (B, B): image i against text j
    return 0.5 * (_diagonal_ce(logits) + _diagonal_ce(logits.T))
