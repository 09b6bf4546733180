"""Direct Preference Optimisation: fit a policy to preference pairs without a reward model
(Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model").

RLHF maximises E[r(x, y)] − β·KL(π ‖ π_ref). Its optimum is π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β), so the
reward is implied by the policy, r(x, y) = β log π(y|x)/π_ref(y|x) + const, and the Bradley–Terry
likelihood of "y_w preferred to y_l" becomes a loss on the policy alone (Eq. 7):

    L = −E log σ(β [log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)])     at π = π_ref: L = log 2

β is the coefficient of the KL penalty, not a temperature: small β lets the policy drift far from the
reference, large β holds it close (the paper uses 0.1, 0.5 for TL;DR summarisation). The implied rewards
β log π/π_ref of the chosen and rejected answers are what trl logs as rewards/chosen and rewards/rejected.

Variants, picked by name from ``LOSSES`` (Δ = chosen log-ratio − rejected log-ratio, summed over tokens):
  sigmoid  −log σ(βΔ)                                   DPO, the notes' formula
  hinge    max(0, 1 − βΔ)                               SLiC (Zhao et al., 2023)
  ipo      (Δ̄ − 1/(2β))², Δ̄ with per-token averages     IPO (Azar et al., 2023, Eq. 17), as trl normalises it
  robust   (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1−2ε)   rDPO (Chowdhury et al., 2024), unbiased under label noise ε
  cdpo     −(1−ε) log σ(βΔ) − ε log σ(−βΔ)              conservative DPO, label smoothing ε (Mitchell, 2023)

Batches hold each pair as two rows of one padded batch, chosen rows first (trl's concatenated forward):
    input_ids, attention_mask, labels (2B, T); labels = input_ids with −100 on prompt and padding
    optional: ref_chosen_logps, ref_rejected_logps (B,) precomputed; index (B,) for a ReferenceLogps cache
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from nanomm.config import Config, option
from nanomm.io import write_safetensors

__all__ = ["DPOConfig", "LOSSES", "REDUCTIONS", "sequence_logps", "dpo_loss", "dpo_metrics", "pair_logps",
           "ReferenceLogps", "precompute_reference_logps", "dpo_objective", "IGNORE_INDEX"]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- sequence log-probabilities

def _sum(token_logps: Tensor, mask: Tensor) -> Tensor:
    return (token_logps * mask).sum(-1)


def _mean(token_logps: Tensor, mask: Tensor) -> Tensor:
    return (token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"sum": _sum, "mean": _mean}  # sum: trl's default


def sequence_logps(logits: Tensor, labels: Tensor, *, reduction: str = "sum") -> Tensor:
    """log π(y|x) of the labelled tokens of each row: logits (B, T, V), labels (B, T) with −100 where no
    token is scored (prompt, padding). Position t predicts labels[t + 1]. Returns (B,) in float32."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected (B, T, V), got {got}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected (B, T) = {tuple(logits.shape[:2])} like the logits, got {got}")
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V); fp32: sums of many small terms
    token_logps = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return REDUCTIONS[reduction](token_logps, mask.to(token_logps.dtype))


def response_lengths(labels: Tensor) -> Tensor:
    """Number of scored tokens per row (B,): what IPO averages over."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


# ----------------------------------------------------------------------------- the loss family

def _sigmoid(c: Tensor, r: Tensor, beta: float, eps: float, lc: Tensor, lr: Tensor) -> Tensor:
    return -F.logsigmoid(beta * (c - r))


def _hinge(c: Tensor, r: Tensor, beta: float, eps: float, lc: Tensor, lr: Tensor) -> Tensor:
    return torch.relu(1 - beta * (c - r))


def _ipo(c: Tensor, r: Tensor, beta: float, eps: float, lc: Tensor, lr: Tensor) -> Tensor:
    # a summed log-ratio grows with length; trl divides by the response length (confirmed by the IPO authors)
    return ((c / lc - r / lr) - 1 / (2 * beta)) ** 2


def _robust(c: Tensor, r: Tensor, beta: float, eps: float, lc: Tensor, lr: Tensor) -> Tensor:
    z = beta * (c - r)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _cdpo(c: Tensor, r: Tensor, beta: float, eps: float, lc: Tensor, lr: Tensor) -> Tensor:
    z = beta * (c - r)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "robust": _robust, "cdpo": _cdpo,
}
_SMOOTHING_RANGE = {"robust": 0.5, "cdpo": 1.0}  # ε must stay below this (robust divides by 1 − 2ε)


def _check_scalars(beta: float, loss: str, label_smoothing: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta: expected a finite number > 0 (the KL coefficient), got {beta!r}")
    top = _SMOOTHING_RANGE.get(loss, 1.0)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < top:
        raise ValueError(f"label_smoothing: expected a number in [0, {top}) for loss={loss!r}, got {label_smoothing!r}")
    if label_smoothing and loss not in _SMOOTHING_RANGE:
        raise ValueError(f"label_smoothing: only {list(_SMOOTHING_RANGE)} use it; got {label_smoothing} "
                         f"with loss={loss!r}")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss over pairs, and the implied rewards β log π/π_ref of chosen and rejected (B,), detached.

    All four log-prob arguments are (B,) sequence log-probabilities. The lengths (B,) are the numbers of
    response tokens, used by "ipo" only (None: 1, the paper's unnormalised form).
    """
    _check_scalars(beta, loss, label_smoothing)
    args = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected}
    for name, t in args.items():
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape != policy_chosen.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a (B,) tensor like policy_chosen {tuple(policy_chosen.shape)}, "
                             f"got {got}")
    ones = torch.ones_like(policy_chosen)
    lc = ones if chosen_lengths is None else chosen_lengths.to(ones).clamp(min=1)
    lr = ones if rejected_lengths is None else rejected_lengths.to(ones).clamp(min=1)
    chosen_ratio = policy_chosen - ref_chosen  # log π(y_w)/π_ref(y_w), (B,)
    rejected_ratio = policy_rejected - ref_rejected
    per_pair = LOSSES[loss](chosen_ratio, rejected_ratio, beta, label_smoothing, lc, lr)
    return per_pair.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor,
                policy_rejected: Tensor) -> dict[str, float]:
    """What trl logs: batch means of the implied rewards, their margin, how often chosen > rejected."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }


# ----------------------------------------------------------------------------- batches and models

_BATCH_KEYS = ("input_ids", "labels")


def _check_batch(batch: Any) -> int:
    if not isinstance(batch, dict) or any(k not in batch for k in _BATCH_KEYS):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch: expected a dict with {list(_BATCH_KEYS)} (and attention_mask), got {got}")
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.dim() != 2 or ids.shape[0] % 2 or labels.shape != ids.shape:
        raise ValueError(f"batch: expected input_ids and labels (2B, T), chosen rows then rejected rows, got "
                         f"input_ids {tuple(ids.shape)}, labels {tuple(labels.shape)}")
    return ids.shape[0] // 2


def pair_logps(model: nn.Module, batch: dict[str, Tensor], *, reduction: str = "sum") -> tuple[Tensor, Tensor]:
    """(chosen, rejected) sequence log-probs (B,) from one forward over the 2B rows."""
    B = _check_batch(batch)
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits if hasattr(out, "logits") else out
    logps = sequence_logps(logits, batch["labels"], reduction=reduction)  # (2B,)
    return logps[:B], logps[B:]


class ReferenceLogps:
    """π_ref's log-probs of every pair, computed once and kept on disk: DPO then needs no reference model.

    File: safetensors with "index", "chosen", "rejected" (N,) and the reduction in its metadata.
    """

    def __init__(self, index: Tensor, chosen: Tensor, rejected: Tensor, reduction: str = "sum"):
        order = index.argsort()
        self.index, self.chosen, self.rejected = index[order], chosen[order], rejected[order]
        self.reduction = reduction
        if bool((self.index[1:] == self.index[:-1]).any()):
            raise ValueError("index: expected each example index once, got duplicates")

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.searchsorted(self.index, index.to(self.index.device))
        found = (pos < len(self.index)) & (self.index[pos.clamp(max=len(self.index) - 1)] == index)
        if not bool(found.all()):
            raise KeyError(f"index: examples {index[~found].tolist()[:10]} have no cached reference log-probs")
        return self.chosen[pos], self.rejected[pos]

    def save(self, path: str | os.PathLike) -> None:
        write_safetensors(path, {"index": self.index, "chosen": self.chosen, "rejected": self.rejected},
                          metadata={"reduction": self.reduction})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceLogps":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            reduction = (f.metadata() or {}).get("reduction", "sum")
        t = load_file(str(path))
        return cls(t["index"], t["chosen"], t["rejected"], reduction)


def _reference_context(model: nn.Module, reference: nn.Module | None):
    if reference is not None:
        return nullcontext()
    from nanomm.peft import disable_adapters  # train → peft is allowed; imported late to keep train light

    return disable_adapters(model)


@torch.no_grad()
def _reference_logps(model: nn.Module, reference: nn.Module | None, batch: dict[str, Tensor], reduction: str
                     ) -> tuple[Tensor, Tensor]:
    net = reference if reference is not None else model
    was_training = net.training
    net.eval()  # no dropout in the reference: it is a fixed function
    try:
        with _reference_context(model, reference):
            return pair_logps(net, batch, reduction=reduction)
    finally:
        net.train(was_training)


def precompute_reference_logps(reference: nn.Module, batches: Iterable[dict[str, Tensor]],
                               path: str | os.PathLike | None = None, *, reduction: str = "sum",
                               disable_adapters: bool = False) -> ReferenceLogps:
    """One pass of the reference over batches that carry ``index`` (B,); optionally saved to ``path``.
    ``disable_adapters`` True: ``reference`` is the PEFT policy itself, read with its adapters off."""
    idx, chosen, rejected = [], [], []
    for batch in batches:
        if "index" not in batch:
            raise ValueError("batch: expected an 'index' (B,) entry naming each pair, to key the cache")
        c, r = _reference_logps(reference, None if disable_adapters else reference, batch, reduction)
        idx.append(batch["index"].cpu())
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    if not idx:
        raise ValueError("batches: expected at least one batch, got none")
    cache = ReferenceLogps(torch.cat(idx), torch.cat(chosen), torch.cat(rejected), reduction)
    if path is not None:
        cache.save(path)
    return cache


# ----------------------------------------------------------------------------- the objective

@dataclass
class DPOConfig(Config):
    """How the DPO objective scores a batch."""

    beta: float = option(0.1, "β, the KL-penalty coefficient (not a temperature): larger keeps π closer to π_ref")
    loss: str = option("sigmoid", f"the loss, one of {list(LOSSES)}")
    label_smoothing: float = option(0.0, "ε, the assumed rate of flipped preference labels (robust, cdpo)")
    reduction: str = option("sum", "sequence log-prob over response tokens: 'sum' (trl, the paper) or 'mean'",
                        tuple(REDUCTIONS))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_scalars(self.beta, self.loss, self.label_smoothing)


Objective = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


def dpo_objective(policy: nn.Module, reference: nn.Module | None = None, *, config: DPOConfig | None = None,
                  reference_logps: ReferenceLogps | None = None) -> Objective:
    """An objective ``(model, batch) -> (loss, metrics)`` for the shared trainer.

    reference: a frozen copy of the starting policy, or None for "the policy with its PEFT adapters
    disabled" (no second model in memory; the policy must have adapters). Reference log-probs come,
    in this order, from the batch (ref_chosen_logps / ref_rejected_logps), from ``reference_logps``
    (looked up by the batch's ``index``), or from a no-grad forward of the reference.
    """
    config = config or DPOConfig()
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy: expected a torch.nn.Module, got {type(policy).__name__}")
    if reference is policy:
        raise ValueError("reference: expected a frozen copy of the policy or None, got the policy itself")
    if reference is None and reference_logps is None:
        from nanomm.peft import has_adapters

        if not has_adapters(policy):
            raise ValueError("reference: None means 'the policy with its adapters disabled', but the policy has "
                             "no PEFT adapters; pass a frozen copy (copy.deepcopy before training) instead")
    if reference is not None:
        reference.requires_grad_(False).eval()
    if reference_logps is not None and reference_logps.reduction != config.reduction:
        raise ValueError(f"reference_logps: computed with reduction={reference_logps.reduction!r}, but "
                         f"config.reduction={config.reduction!r}")

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        B = _check_batch(batch)
        chosen, rejected = pair_logps(model, batch, reduction=config.reduction)
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif reference_logps is not None:
            ref_c, ref_r = reference_logps.lookup(batch["index"])
        else:
            ref_c, ref_r = _reference_logps(model, reference, batch, config.reduction)
        # a per-token mean is already length-normalised; IPO divides summed log-ratios by the lengths
        lengths = response_lengths(batch["labels"]) if config.reduction == "sum" else torch.ones(2 * B)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_c.to(chosen), ref_r.to(chosen), beta=config.beta, loss=config.loss,
            label_smoothing=config.label_smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        return loss, dpo_metrics(chosen_rewards, rejected_rewards, chosen, rejected)

    return objective
