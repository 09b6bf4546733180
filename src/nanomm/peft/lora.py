"""LoRA: fine-tune a frozen linear layer through a low-rank update (Hu et al., 2021, "LoRA").

    y = W x + (α/r) · B A dropout(x)        A (r, in), B (out, r), r ≪ min(in, out)

A starts Kaiming-uniform (a = √5, nn.Linear's own init, as loralib and peft do) and B at zero, so the
product BA is zero and the adapted model computes exactly what the base model did (§4.1). Only A and
B train: r·(in + out) numbers per layer instead of in·out. Dropout acts on the low-rank path's input
only. rsLoRA (Kalajdzievic, 2023) scales by α/√r instead of α/r, which keeps the update's magnitude
stable as r grows.

Because the update is linear it merges into the weight, W' = W + (α/r)·BA, and inference then costs
nothing extra; unmerging subtracts it again. A merge that would put NaN or inf into W is refused.
On disk the adapter uses peft's layout (adapter_config.json + adapter_model.safetensors with
``base_model.model.<transformers path>.lora_A.weight``), so peft and nanomm read each other's files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from nanomm.peft.config import LoraConfig
from nanomm.peft.hf_names import PEFT_PREFIX, HfNames, check_supported
from nanomm.peft.layer import PeftLayer, select_modules, wrap_modules

__all__ = ["LoraLinear", "inject", "to_peft", "from_peft"]


class LoraLinear(PeftLayer):
    """base(x) + scaling · lora_B(lora_A(dropout(x))), around a frozen nn.Linear ``base``."""

    mergeable = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # BA = 0: the model is unchanged at the start

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        if self.merged:
            return
        merged = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        if safe and not bool(torch.isfinite(merged).all()):
            raise ValueError("merge: the merged weight would contain NaN or inf; the adapter is broken, "
                             "refusing to write it into the base layer")
        self.base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def inject(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the chosen nn.Linear modules of ``model`` in LoraLinear; returns their names."""
    names = select_modules(model, config.target_modules, config.exclude_modules)
    wrap_modules(model, names, lambda name, m: LoraLinear(m, config.r, config.alpha, dropout=config.dropout,
                                                          use_rslora=config.use_rslora))
    return names


# ----------------------------------------------------------------------------- peft's file layout

_PARTS = ("lora_A", "lora_B")


def to_peft(model: nn.Module, config: LoraConfig, layers: dict[str, PeftLayer], names: HfNames
            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) in peft's layout."""
    tensors = {f"{PEFT_PREFIX}{names.to_hf(n)}.{part}.weight": getattr(layer, part).weight
               for n, layer in layers.items() for part in _PARTS}
    cfg = {"peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
           "use_rslora": config.use_rslora, "target_modules": sorted(names.to_hf(n) for n in layers),
           "exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
           "inference_mode": True, "task_type": None, "base_model_name_or_path": None, "modules_to_save": None}
    return cfg, tensors


# options of peft's LoRA that nanomm does not implement, with the values that mean "off"
_UNSUPPORTED: dict[str, tuple] = {
    "use_dora": (None, False), "bias": (None, "none"), "fan_in_fan_out": (None, False),
    "modules_to_save": (None, []), "layers_to_transform": (None, []), "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}), "use_qalora": (None, False), "lora_bias": (None, False),
}


def from_peft(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], names: HfNames
              ) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The LoraConfig of a peft LoRA file, and its tensors keyed by the nanomm parameter they fill."""
    check_supported(cfg, _UNSUPPORTED, "LoRA")
    params: dict[str, Tensor] = {}
    for key, value in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter_model.safetensors: tensor {key!r} is not a LoRA weight "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
        params[f"{names.from_hf(module)}.lora_{part}"] = value
    modules = sorted({p.rpartition(".lora_")[0] for p in params})
    config = LoraConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                        dropout=float(cfg.get("lora_dropout") or 0.0), target_modules=modules,
                        use_rslora=bool(cfg.get("use_rslora") or False))
    return config, params
