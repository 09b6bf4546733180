"""The CLIP objective for the shared trainer: symmetric InfoNCE over one batch of image–text pairs.

    logits = min(e^t, 100) · normalize(u) normalize(v)ᵀ          (B, B), pair i on the diagonal
    L = ½ [CE(logits, arange B) + CE(logitsᵀ, arange B)]        nanomm.nn.losses.clip_loss

Every other caption of the batch is a negative for an image and vice versa, so the batch size is
the number of negatives (CLIP used 32,768). Identical captions inside a batch are false negatives;
the loss then cannot reach 0, but its gradient still pulls each image toward its own text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nanomm.models.clip import CLIP
from nanomm.nn.losses import clip_loss

__all__ = ["clip_objective"]

_KEYS = ("pixel_values", "input_ids", "attention_mask")


def clip_objective(model: CLIP, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """(model, {"pixel_values" (B, 3, H, W), "input_ids" (B, T), "attention_mask" (B, T)}) → (loss, metrics).

    metrics: in-batch matching accuracy both ways and the current logit scale s = e^t (≤ 100).
    """
    if not isinstance(batch, dict) or any(k not in batch for k in _KEYS):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch: expected a dict with keys {list(_KEYS)}, got {got}")
    device = model.logit_scale.device
    img = model.encode_image(batch["pixel_values"].to(device), normalize=False)  # (B, P)
    txt = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device), normalize=False)
    loss = clip_loss(img, txt, model.logit_scale)
    with torch.no_grad():
        sim = torch.nn.functional.normalize(img.float(), dim=-1) @ torch.nn.functional.normalize(txt.float(), dim=-1).T
        target = torch.arange(sim.shape[0], device=sim.device)
        metrics = {"i2t_acc": float((sim.argmax(1) == target).float().mean()),
                   "t2i_acc": float((sim.argmax(0) == target).float().mean()),
                   "logit_scale": float(model.scale)}
    return loss, metrics
