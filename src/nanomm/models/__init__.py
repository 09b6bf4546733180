"""Architectures built from nanomm.nn: BERT, GPT-1/2/3 and LLaMA, their configs, sizes and HF interop.

    config = nanomm.models.preset("gpt2")            # a GPTConfig
    model = nanomm.models.build(config)              # a GPT on CPU; device="meta" allocates nothing
    nanomm.models.count_params(config).total         # 124,439,808, from the config alone
    model = nanomm.models.from_hf("path/to/hf-dir")  # BERT, GPT-2 or LLaMA weights
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nanomm.models.bert import BertForPreTraining, BertModel
from nanomm.models.config import BertConfig, GPTConfig, LlamaConfig, ModelConfig, describe, preset, preset_names
from nanomm.models.gpt import GPT
from nanomm.models.llama import Llama
from nanomm.models.outputs import BaseModelOutput, CausalLMOutput, PreTrainingOutput
from nanomm.models.params import ParamCount, count_params, params_rows, print_params_table
from nanomm.models.vision_config import CLIPConfig, ViTConfig, vision_preset
from nanomm.models.vit import ViT
from nanomm.models.clip import CLIP

__all__ = [
    "BertConfig", "GPTConfig", "LlamaConfig", "ModelConfig", "preset", "preset_names", "describe",
    "BertModel", "BertForPreTraining", "GPT", "Llama", "build", "count_params", "ParamCount",
    "params_rows", "print_params_table", "BaseModelOutput", "CausalLMOutput", "PreTrainingOutput",
    "from_hf", "to_hf", "ViT", "CLIP", "ViTConfig", "CLIPConfig", "vision_preset",
]

BERT_TASKS: dict[str, type[nn.Module]] = {"base": BertModel, "pretraining": BertForPreTraining}

BUILDERS: dict[type[ModelConfig], Callable[[ModelConfig], nn.Module]] = {
    BertConfig: lambda c: BERT_TASKS[c.task](c),
    GPTConfig: GPT,
    LlamaConfig: Llama,
    ViTConfig: ViT,
    CLIPConfig: CLIP,
}


def build(config: ModelConfig | str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate the model of a config (or preset name). device="meta" gives shapes without memory,
    which is how GPT-3's 175B parameters are counted here."""
    if isinstance(config, str):
        config = preset(config)
    if type(config) not in BUILDERS:
        raise TypeError(f"config: expected one of {[t.__name__ for t in BUILDERS]} or a preset name, "
                        f"got {type(config).__name__}")
    with torch.device(device):
        model = BUILDERS[type(config)](config)
    return model if dtype is None else model.to(dtype)


def from_hf(path, **kwargs):  # noqa: ANN001 - documented in nanomm.models.hub
    """Load a local Hugging Face directory; see ``nanomm.models.hub.from_hf``."""
    from nanomm.models.hub import from_hf as _from_hf

    return _from_hf(path, **kwargs)


def to_hf(model, path, **kwargs):  # noqa: ANN001 - documented in nanomm.models.hub
    """Write a model as a Hugging Face directory; see ``nanomm.models.hub.to_hf``."""
    from nanomm.models.hub import to_hf as _to_hf

    return _to_hf(model, path, **kwargs)
