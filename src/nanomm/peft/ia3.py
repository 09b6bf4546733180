"""(IA)³: fine-tune by rescaling activations with learned vectors (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", §3.3, T-Few).

    k = l_k ⊙ (W_k x)        v = l_v ⊙ (W_v x)        ffn(x) = W_down (l_ff ⊙ γ(x))

Three vectors per layer, all initialised to ones, so the model starts unchanged; for LLaMA that is
2·n_kv·D + ff numbers per layer, fewer than any LoRA. Scaling the output of a projection W is
scaling W's rows; scaling the input of W_down is scaling its columns: both merge into the weights,
diag(l) W and W diag(l), and unmerge by dividing (refused when a scale is zero).

The vectors are kept 1-D here (weight decay skips them, as it should: decaying towards 0 would not
be decaying towards the identity); peft's files store them as (out, 1) or (1, in), converted on save
and load. Keys are scaled before RoPE, as in peft, since it is the output of ``k_proj`` that is scaled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nanomm.peft.config import IA3Config
from nanomm.peft.hf_names import PEFT_PREFIX, HfNames, check_supported
from nanomm.peft.layer import PeftLayer, matches, select_modules, wrap_modules

__all__ = ["IA3Linear", "inject", "to_peft", "from_peft"]


class IA3Linear(PeftLayer):
    """base(x) ⊙ l (output scaled), or base(x ⊙ l) for a feed-forward down-projection (input scaled)."""

    mergeable = True

    def __init__(self, base: nn.Linear, *, feedforward: bool):
        super().__init__(base)
        self.feedforward = feedforward
        n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l

    def _axis(self, scale: Tensor) -> Tensor:
        return scale[None, :] if self.feedforward else scale[:, None]  # columns or rows of W (out, in)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        if self.merged:
            return
        w = self.base.weight * self._axis(self.ia3_l)
        b = self.base.bias * self.ia3_l if (self.base.bias is not None and not self.feedforward) else None
        if safe and not (bool(torch.isfinite(w).all()) and (b is None or bool(torch.isfinite(b).all()))):
            raise ValueError("merge: the merged weight would contain NaN or inf; refusing to write it")
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if bool((self.ia3_l == 0).any()):
            raise ValueError("unmerge: a scale is exactly 0, so the merged weight lost that row/column; "
                             "it cannot be recovered")
        self.base.weight.div_(self._axis(self.ia3_l))
        if self.base.bias is not None and not self.feedforward:
            self.base.bias.div_(self.ia3_l)
        self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def inject(model: nn.Module, config: IA3Config) -> list[str]:
    """Wrap the chosen nn.Linear modules in IA3Linear; feed-forward ones scale their input."""
    names = select_modules(model, config.target_modules, config.exclude_modules)
    ff = {n for n, _ in model.named_modules() if n and matches(config.feedforward_modules, n)}
    stray = sorted(ff - set(names) - {n for n in ff if matches(config.exclude_modules, n)})
    if stray:
        raise ValueError(f"feedforward_modules: expected a subset of the target modules, but {stray} are not targets")
    wrap_modules(model, names, lambda name, m: IA3Linear(m, feedforward=name in ff))
    return names


# ----------------------------------------------------------------------------- peft's file layout

def to_peft(model: nn.Module, config: IA3Config, layers: dict[str, PeftLayer], names: HfNames
            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors = {f"{PEFT_PREFIX}{names.to_hf(n)}.ia3_l": layer._axis(layer.ia3_l) for n, layer in layers.items()}
    cfg = {"peft_type": "IA3", "target_modules": sorted(names.to_hf(n) for n in layers),
           "feedforward_modules": sorted(names.to_hf(n) for n, layer in layers.items() if layer.feedforward),
           "exclude_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True,
           "task_type": None, "base_model_name_or_path": None, "modules_to_save": None}
    return cfg, tensors


_UNSUPPORTED: dict[str, tuple] = {"fan_in_fan_out": (None, False), "modules_to_save": (None, [])}


def from_peft(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], names: HfNames
              ) -> tuple[IA3Config, dict[str, Tensor]]:
    """The IA3Config of a peft IA3 file, and its vectors (flattened) keyed by the nanomm parameter."""
    check_supported(cfg, _UNSUPPORTED, "IA3")
    params, ff = {}, []
    for key, value in tensors.items():
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".ia3_l")
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".ia3_l") or value.dim() != 2 or 1 not in value.shape:
            raise ValueError(f"adapter_model.safetensors: tensor {key!r} {tuple(value.shape)} is not an IA3 "
                             f"vector '{PEFT_PREFIX}<module>.ia3_l' of shape (out, 1) or (1, in)")
        ours = names.from_hf(module)
        if matches(cfg.get("feedforward_modules"), module):
            ff.append(ours)
        params[f"{ours}.ia3_l"] = value.flatten()
    targets = sorted(p.removesuffix(".ia3_l") for p in params)
    config = IA3Config(target_modules=targets, feedforward_modules=sorted(ff) or None)
    return config, params
