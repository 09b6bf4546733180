"""Training objectives: each is a function ``(model, batch) -> (loss, metrics)`` for the shared Trainer.

    causal_lm   L = −(1/N) Σ_t log p(x_{t+1} | x_≤t)                       (GPT, LLaMA pretraining)
    mlm_nsp     L = CE(masked tokens) + CE(IsNext / NotNext)               (BERT pretraining, Devlin et al.)

New training methods (SFT, DPO, CLIP, BLIP-2, LLaVA) are new objectives, never new training loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding, unmasked tokens)


def token_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the positions whose target is not IGNORE_INDEX, and the accuracy there."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX)
    keep = flat_targets != IGNORE_INDEX
    accuracy = (flat_logits.argmax(-1)[keep] == flat_targets[keep]).float().mean()
    return loss, accuracy


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token prediction; ``batch["targets"]`` is ``input_ids`` shifted left by one (see data.lm)."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    loss, accuracy = token_cross_entropy(out.logits, batch["targets"])
    return loss, {"accuracy": float(accuracy)}


def mlm_nsp(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """BERT's two pretraining losses, summed as in the paper."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    mlm_loss, mlm_acc = token_cross_entropy(out.prediction_logits, batch["labels"])
    nsp_logits = out.seq_relationship_logits.float()
    nsp_loss = F.cross_entropy(nsp_logits, batch["next_sentence_label"])
    nsp_acc = (nsp_logits.argmax(-1) == batch["next_sentence_label"]).float().mean()
    return mlm_loss + nsp_loss, {"mlm_loss": float(mlm_loss.detach()), "mlm_accuracy": float(mlm_acc),
                                 "nsp_loss": float(nsp_loss.detach()), "nsp_accuracy": float(nsp_acc)}


@torch.no_grad()
def unigram_cross_entropy(train_tokens: Tensor, eval_tokens: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under the add-one unigram model of ``train_tokens``:
    the loss of a model that ignores context, the baseline a language model must beat."""
    counts = torch.bincount(train_tokens.flatten().long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[eval_tokens.flatten().long()].mean())
