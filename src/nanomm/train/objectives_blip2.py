"""BLIP-2's objectives for the shared Trainer: stage 1 (ITC + ITM + ITG on the Q-Former), stage 2 (generative).

Stage 1 (Li et al., 2023, §3.2) trains the Q-Former with three losses, each with its own attention mask
(nanomm.models.qformer.MASKS), summed with equal weights as in LAVIS. Only the first is contrastive:

  ITC  image–text contrastive. z_q: the N_q query outputs projected and L2-normalised; t: the text's
       [CLS] output projected and normalised. s(I, T) = max_q ⟨z_q, t⟩ / τ, τ learned (init 0.07,
       clamped to [0.001, 0.5]); L = ½ [CE(s(I, ·), diag) + CE(s(·, T), diag)], label smoothing 0.1.
       Queries and text never see each other (two separate passes, "unimodal" mask).
  ITM  image–text matching: a binary classifier on the query outputs (averaged over queries) of a
       joint pass where queries and text see each other ("bidirectional"). Each batch adds, per image, a
       hard negative text and, per text, a hard negative image, sampled ∝ softmax of the ITC similarity
       (pairs with identical text excluded): labels 1 × B, 0 × 2B.
  ITG  image-grounded text generation: [DEC] replaces [CLS]; text token i sees all queries and text
       ≤ i, queries see only queries ("multimodal_causal"), so the text can only learn about the image
       through what the queries extracted. Cross-entropy of the next token, label smoothing 0.1.

Everything runs on one process: LAVIS gathers features across GPUs (all_gather) so that negatives come
from the global batch; here the batch is the global batch. Sampling uses torch's global generator,
which checkpoints save and restore.

Stage 2 (§3.3) feeds [W·Q ; text] to the frozen decoder LM and trains on the caption's next-token loss;
the gradient reaches the Q-Former through the projection W.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanomm.train.objectives import IGNORE_INDEX, token_cross_entropy

__all__ = ["itc_loss", "itm_loss", "itg_loss", "hard_negatives", "stage1", "stage2", "OBJECTIVES",
           "LABEL_SMOOTHING", "TEMPERATURE_RANGE"]

LABEL_SMOOTHING = 0.1  # LAVIS, for ITC and ITG
TEMPERATURE_RANGE = (0.001, 0.5)  # LAVIS clamps τ into this range before every step


def _check_batch(batch: dict, keys: tuple[str, ...]) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"batch: expected a dict, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing or ("pixel_values" in batch) == ("vision_states" in batch):
        raise ValueError(f"batch: expected {list(keys)} and one of pixel_values / vision_states (the frozen ViT's "
                         f"precomputed states), got {sorted(batch)}")


def _image(batch: dict) -> dict[str, Tensor | None]:
    return {"pixel_values": batch.get("pixel_values"), "vision_states": batch.get("vision_states")}


def itc_loss(model: nn.Module, query_output: Tensor, input_ids: Tensor,
             attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """(loss, s_i2t (B, B), s_t2i (B, B), accuracy) with s = max over queries of the cosine, divided by τ."""
    with torch.no_grad():
        model.temp.clamp_(*TEMPERATURE_RANGE)
    image_feats = model.image_feats(query_output)  # (B, N_q, e)
    text_feat = model.text_feat(input_ids, attention_mask)  # (B, e)
    sim_i2t = model.similarity(image_feats, text_feat) / model.temp  # (B_i, B_t)
    sim_t2i = sim_i2t.t()  # max_q ⟨t, z_q⟩ is the same number seen from the text
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2
    accuracy = float((sim_i2t.argmax(-1) == targets).float().mean())
    return loss, sim_i2t, sim_t2i, accuracy


@torch.no_grad()
def hard_negatives(sim: Tensor, same: Tensor) -> Tensor:
    """For each row of ``sim`` (B, B) one column drawn ∝ softmax(row), never a column marked ``same``
    (the row's own pair, or an identical text); a row with no other column falls back to any j ≠ i."""
    logits = sim.float().masked_fill(same, float("-inf"))
    stuck = torch.isneginf(logits).all(-1)  # every candidate is a duplicate of the positive
    if bool(stuck.any()):
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        logits[stuck] = torch.zeros_like(logits[stuck]).masked_fill(eye[stuck], float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)  # (B,)


def _same_text(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, B) True where two rows hold the same text (a pair that must not serve as a negative)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def itm_loss(model: nn.Module, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
             sim_i2t: Tensor, sim_t2i: Tensor) -> tuple[Tensor, float]:
    """Binary match / no-match over B positives, B (image, hard text) and B (hard image, text) pairs."""
    B = input_ids.shape[0]
    same = _same_text(input_ids, attention_mask) | torch.eye(B, dtype=torch.bool, device=input_ids.device)
    neg_text = hard_negatives(sim_i2t, same)  # (B,) a wrong text for each image
    neg_image = hard_negatives(sim_t2i, same)  # (B,) a wrong image for each text
    images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])  # (3B, N, d_v)
    ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # (3B, T)
    mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
    logits = model.itm_logits(images, ids, mask)  # (3B, 2)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits, labels), float((logits.argmax(-1) == labels).float().mean())


def itg_loss(model: nn.Module, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, float]:
    """Next-token loss of the text under the multimodal causal mask, [DEC] as the first token."""
    dec = input_ids.clone()
    dec[:, 0] = model.qformer.config.dec_token_id
    out = model.qformer(image_embeds, dec, attention_mask, mask="multimodal_causal")
    logits = model.qformer.lm_logits(out.text_output)  # (B, T, V)
    targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING)
    keep = targets != IGNORE_INDEX
    accuracy = float((logits[:, :-1].argmax(-1)[keep] == targets[keep]).float().mean())
    return loss, accuracy


def stage1(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """ITC + ITM + ITG. batch: pixel_values (B, 3, H, W) or the frozen ViT's vision_states (B, N, d_v);
    input_ids (B, T) starting with [CLS] (or <s>); attention_mask (B, T)."""
    _check_batch(batch, ("input_ids", "attention_mask"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape[0] < 2:
        raise ValueError(f"batch: ITC and ITM need at least 2 pairs per batch (negatives), got {ids.shape[0]}")
    image_embeds = model.image_embeds(**_image(batch))  # (B, N, d_v)
    query_output = model.query_output(image_embeds)  # (B, N_q, d)
    itc, sim_i2t, sim_t2i, itc_acc = itc_loss(model, query_output, ids, mask)
    itm, itm_acc = itm_loss(model, image_embeds, ids, mask, sim_i2t.detach(), sim_t2i.detach())
    itg, itg_acc = itg_loss(model, image_embeds, ids, mask)
    return itc + itm + itg, {"itc_loss": float(itc.detach()), "itm_loss": float(itm.detach()),
                             "itg_loss": float(itg.detach()),
                             "itc_accuracy": itc_acc, "itm_accuracy": itm_acc, "itg_accuracy": itg_acc,
                             "temperature": float(model.temp.detach())}


def stage2(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Caption loss of the frozen LM behind the visual prefix. batch: pixel_values or vision_states;
    input_ids (B, T) in the LM's vocabulary beginning with its bos token, attention_mask (B, T); the bos
    itself is not predicted."""
    _check_batch(batch, ("input_ids", "attention_mask"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, **_image(batch))  # (B, N_q + T, V)
    n_prefix = out.logits.shape[1] - ids.shape[1]
    text_labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    text_labels[:, 0] = IGNORE_INDEX  # the bos is given, not predicted
    labels = torch.cat([torch.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=ids.dtype, device=ids.device),
                        text_labels], dim=1)
    loss, accuracy = token_cross_entropy(out.logits[:, :-1], labels[:, 1:])
    return loss, {"accuracy": float(accuracy)}


OBJECTIVES: dict[str, Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]]] = {
    "representation": stage1, "generative": stage2,
}
