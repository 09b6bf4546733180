"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1).

    adapter(h) = h + W_up · act(W_down · h + b_down) + b_up        W_down (m, d), W_up (d, m), m ≪ d

Two adapters per layer: one on the output of the attention block's output projection, one on the
output of the feed-forward network, each before the sublayer's residual sum (and before the norm in
a post-LN model, as in the paper's Figure 2). W_up and b_up start at zero, so each adapter is the
identity and the model is unchanged at initialisation; Houlsby's near-identity initialisation is the
same idea. 2md + m + d numbers per adapter.

The adapter is nonlinear, so unlike LoRA and IA3 it cannot be merged into the weights: it costs two
small matrix products per sublayer at inference. nanomm saves it in peft's file names (adapter_config.json
+ adapter_model.safetensors, peft_type "HOULSBY"); peft has no such method, so only nanomm reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from nanomm.nn.mlp import ACTIVATIONS
from nanomm.peft.config import AdapterConfig
from nanomm.peft.hf_names import PEFT_PREFIX, HfNames
from nanomm.peft.layer import PeftLayer, select_modules, wrap_modules

__all__ = ["Bottleneck", "AdapterWrapped", "inject", "to_peft", "from_peft", "output_width"]


class Bottleneck(nn.Module):
    """up(act(down(h))): the residual branch of one adapter; zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int, activation: str, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.act(self.down(h)))


class AdapterWrapped(PeftLayer):
    """h = base(...); h + adapter(h)."""

    def __init__(self, base: nn.Module, dim: int, bottleneck: int, activation: str):
        super().__init__(base)
        p = next(base.parameters())
        self.adapter = Bottleneck(dim, bottleneck, activation, device=p.device, dtype=p.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        h = self.base(*args, **kwargs)
        return h + self.adapter(h) if self.enabled else h


def output_width(name: str, module: nn.Module) -> int:
    """The width of a module's output: a Linear's out_features, else that of its last Linear."""
    if isinstance(module, nn.Linear):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"target_modules: {name} ({type(module).__name__}) has no nn.Linear, so the width of its "
                        "output is unknown; target a linear layer or a feed-forward block")
    return linears[-1].out_features  # fc_out / down_proj: the FFN's output projection comes last


def inject(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap the chosen modules (attention output projections and FFNs by default) with an adapter."""
    names = select_modules(model, config.target_modules, config.exclude_modules, kinds=(nn.Module,),
                           what="nn.Module")
    wrap_modules(model, names, lambda name, m: AdapterWrapped(m, output_width(name, m), config.bottleneck,
                                                              config.activation))
    return names


# ----------------------------------------------------------------------------- files (peft's names)

_PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")


def to_peft(model: nn.Module, config: AdapterConfig, layers: dict[str, PeftLayer], names: HfNames
            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors = {f"{PEFT_PREFIX}{n}.adapter.{p}": layer.adapter.get_parameter(p)
               for n, layer in layers.items() for p in _PARAMS}
    cfg = {"peft_type": "HOULSBY", **dataclasses.asdict(config), "target_modules": sorted(layers),
           "exclude_modules": None}
    return cfg, tensors


def from_peft(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], names: HfNames
              ) -> tuple[AdapterConfig, dict[str, Tensor]]:
    params = {}
    for key, value in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".adapter.")
        if not key.startswith(PEFT_PREFIX) or part not in _PARAMS:
            raise ValueError(f"adapter_model.safetensors: tensor {key!r} is not an adapter weight "
                             f"'{PEFT_PREFIX}<module>.adapter.{{down,up}}.{{weight,bias}}'")
        params[f"{module}.adapter.{part}"] = value
    fields = {k: v for k, v in cfg.items() if k != "peft_type"}
    config = AdapterConfig.from_dict({**fields, "target_modules": sorted({p.rpartition(".adapter.")[0]
                                                                          for p in params})})
    return config, params
