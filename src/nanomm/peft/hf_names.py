"""nanomm module names <-> the module paths of the equivalent transformers model, for peft's file layout.

peft names an adapter tensor after the module it sits on, inside the transformers model:
    base_model.model.<transformers module path>.lora_A.weight
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (LlamaForCausalLM)
The table is derived from the weight-name rules of ``nanomm.models.hub_formats`` (the ones that copy
a ``<module>.weight`` tensor unchanged), so it follows the models' own Hugging Face mapping. Modules
with no one-to-one counterpart (GPT-2's fused, transposed c_attn) keep their nanomm names: such an
adapter still saves and loads in nanomm, but peft cannot read it; a file uses transformers paths for
all of its modules or for none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PEFT_PREFIX", "HfNames", "check_supported"]

PEFT_PREFIX = "base_model.model."  # what peft puts in front of module paths in adapter_model.safetensors


def _copies_unchanged(rule) -> bool:
    probe = torch.zeros(1)
    try:
        out = rule.load(probe)
    except Exception:  # a rule that splits or reshapes is not a plain copy
        return False
    return rule.save is None and len(rule.ours) == 1 and len(out) == 1 and out[0] is probe


def _module_table(model: nn.Module) -> dict[str, str]:
    """nanomm module name -> transformers module path, for every module whose weight copies unchanged."""
    from nanomm.models.bert import BertForPreTraining, BertModel
    from nanomm.models.hub import hf_format_of
    from nanomm.models.hub_formats import FAMILIES

    try:
        model_type, _ = hf_format_of(model)
    except TypeError:
        return {}
    family = FAMILIES[model_type]
    hf_prefix = "" if isinstance(model, BertModel) else family.base_prefix
    ours_prefix = "bert." if isinstance(model, BertForPreTraining) else ""
    modules = dict(model.named_modules())
    n_layer = getattr(model.config, "n_layer", 0)
    table: dict[str, str] = {}
    for rule in family.rules:
        if not (rule.write and rule.hf.endswith(".weight") and _copies_unchanged(rule)
                and rule.ours[0].endswith(".weight")):
            continue
        for i in (range(n_layer) if "{i}" in rule.hf else [None]):
            hf = rule.hf[: -len(".weight")].format(i=i)
            ours = rule.ours[0][: -len(".weight")].format(i=i)
            if not hf.startswith(family.head_prefixes):
                hf = hf_prefix + hf
            # the rules name BERT's encoder without nanomm's "bert." and its heads (mlm, nsp) as they are
            found = next((c for c in (ours_prefix + ours, ours) if c in modules), None)
            if found is not None:
                table[found] = hf
    return table


class HfNames:
    """Translate module names of one nanomm model to and from its transformers counterpart."""

    def __init__(self, model: nn.Module, modules: list[str] | None = None) -> None:
        self.to_hf_table = _module_table(model)
        if modules is not None and not all(m in self.to_hf_table for m in modules):
            # all or nothing: a file half in transformers paths would load partly, and silently, in peft
            self.to_hf_table = {}
        self.from_hf_table = {hf: ours for ours, hf in self.to_hf_table.items()}

    def to_hf(self, name: str) -> str:
        """The transformers path of a nanomm module, or its nanomm name when there is none."""
        return self.to_hf_table.get(name, name)

    def from_hf(self, name: str) -> str:
        """The nanomm name of a module path found in a peft file (nanomm names pass through)."""
        return self.from_hf_table.get(name, name)


def check_supported(cfg: dict[str, Any], table: dict[str, tuple], method: str) -> None:
    """Refuse a peft option nanomm does not implement; ``table`` maps it to the values that mean "off"."""
    for key, off in table.items():
        if cfg.get(key) not in off:
            raise ValueError(f"adapter_config.json: {key}={cfg[key]!r} is not supported by nanomm's {method} "
                             f"(expected one of {list(off)})")
