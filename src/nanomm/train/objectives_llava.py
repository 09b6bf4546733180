"""LLaVA's objective for the shared Trainer: next-token loss on the answer, the image spliced into the prompt.

    L = −(1/|A|) Σ_{t ∈ A} log p(x_t | x_<t, image)        A: the answer (caption) tokens only

Both stages use this one loss (Liu et al., 2023, §4.2); they differ in what is trainable
(nanomm.models.llava.STAGES) and in the data: stage 1 "feature alignment" pairs an image with its
caption behind a minimal prompt, stage 2 "visual instruction tuning" with question–answer turns.
Prompt and image positions carry IGNORE_INDEX, so the model is never trained to predict the
question or the image features.
"""

from __future__ import annotations

from torch import Tensor, nn

from nanomm.train.objectives import token_cross_entropy

__all__ = ["llava_lm"]


def llava_lm(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """batch: pixel_values (B, 3, H, W) or the frozen tower's vision_states (B, N, d_v); input_ids (B, T)
    with one <image> token per row; attention_mask (B, T); labels (B, T), IGNORE_INDEX except on the
    answer tokens."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch: expected a dict, got {type(batch).__name__}")
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
    if missing or ("pixel_values" in batch) == ("vision_states" in batch):
        raise ValueError(f"batch: expected input_ids, attention_mask, labels and one of pixel_values / vision_states; "
                         f"got keys {sorted(batch)}")
    s = model.splice(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"], batch["labels"],
                     vision_states=batch.get("vision_states"))
    out = model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask)  # (B, T + N − 1, V)
    loss, accuracy = token_cross_entropy(out.logits[:, :-1], s.labels[:, 1:])
    return loss, {"accuracy": float(accuracy)}
