"""Put a PEFT method on a model, take it off, merge it, switch it off, save and load it.

    report = apply(model, LoraConfig(r=8, target_modules="all-linear"))   # in place; base frozen
    print(report)        # trainable params: 1,835,008 || all params: ... || trainable%: ...  (peft's line)
    with disable_adapters(model): ...                       # the base model, no second copy in memory
    merge(model); unmerge(model); merge_and_unload(model)   # LoRA and IA3 only: linear in the weights
    save(model, "adapter/"); load(other, "adapter/")         # peft's files: adapter_config.json + safetensors

The method is picked from ``METHODS`` by the config's class. The parameter count is peft's
``get_nb_trainable_parameters``: every parameter of the adapted model once (tied weights once),
trainable ones being those with requires_grad.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from nanomm.io import atomic_dir, write_json, write_safetensors
from nanomm.peft import adapter, ia3, lora, prefix
from nanomm.peft.config import PeftConfig
from nanomm.peft.hf_names import HfNames
from nanomm.peft.layer import PeftLayer, peft_layers, replace_module

__all__ = ["METHODS", "PEFT_TYPES", "PeftReport", "apply", "count_parameters", "peft_config", "has_adapters",
           "disable_adapters", "merge", "unmerge", "merge_and_unload", "unload", "save", "load",
           "CONFIG_FILE", "WEIGHTS_FILE"]

METHODS: dict[str, ModuleType] = {"lora": lora, "ia3": ia3, "adapter": adapter, "prefix": prefix}
PEFT_TYPES: dict[str, str] = {"LORA": "lora", "IA3": "ia3", "HOULSBY": "adapter", "PREFIX_TUNING": "prefix"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_ATTR = "nanomm_peft_config"


@dataclass
class PeftReport:
    """Trainable and total parameters of an adapted model, and the modules adapted."""

    trainable: int
    total: int
    targets: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # peft's print_trainable_parameters line
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def peft_config(model: nn.Module) -> PeftConfig | None:
    """The config of the method applied to ``model``, or None."""
    return getattr(model, _ATTR, None)


def has_adapters(model: nn.Module) -> bool:
    return bool(peft_layers(model)) or prefix.find(model) is not None


def apply(model: nn.Module, config: PeftConfig, *, verbose: bool = False) -> PeftReport:
    """Freeze ``model`` and add the method of ``config`` in place; returns the parameter counts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PeftConfig) or config.method not in METHODS:
        raise TypeError(f"config: expected one of LoraConfig, PrefixConfig, AdapterConfig, IA3Config, "
                        f"got {type(config).__name__}")
    if has_adapters(model):
        raise ValueError("model: already has adapters; merge_and_unload() or unload() it before applying another")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)  # new adapter parameters are created trainable after this
    try:
        targets = METHODS[config.method].inject(model, config)
    except Exception:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        raise
    setattr(model, _ATTR, config)
    report = PeftReport(*count_parameters(model), targets=targets)
    if verbose:
        print(report)
    return report


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes what its base model does (DPO's reference, for free)."""
    layers, pre = peft_layers(model), prefix.find(model)
    if not layers and pre is None:
        raise ValueError("model: has no adapters to disable")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"model: adapters are merged into the weights of {merged[:5]}; unmerge() first")
    switches = list(layers.values()) + ([pre] if pre is not None else [])
    before = [s.enabled for s in switches]
    for s in switches:
        s.enabled = False
    try:
        yield model
    finally:
        for s, flag in zip(switches, before):
            s.enabled = flag


def _mergeable_layers(model: nn.Module) -> dict[str, PeftLayer]:
    if prefix.find(model) is not None:
        raise ValueError("model: a prefix changes the attention inputs, not a weight; it cannot be merged")
    layers = peft_layers(model)
    if not layers:
        raise ValueError("model: has no adapters to merge")
    wrong = [n for n, layer in layers.items() if not layer.mergeable]
    if wrong:
        raise ValueError(f"model: {type(layers[wrong[0]]).__name__} adapters are nonlinear and cannot be merged "
                         f"(e.g. {wrong[:3]}); only LoRA and IA3 merge")
    return layers


def merge(model: nn.Module, *, safe: bool = True) -> None:
    """Write the adapters into the base weights; all or nothing when a merge would give NaN/inf."""
    done = []
    try:
        for layer in _mergeable_layers(model).values():
            if not layer.merged:
                layer.merge(safe=safe)
                done.append(layer)
    except ValueError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Take merged adapters back out of the base weights."""
    for layer in _mergeable_layers(model).values():
        layer.unmerge()


def _strip(model: nn.Module) -> nn.Module:
    for name, layer in peft_layers(model).items():
        replace_module(model, name, layer.base)
    prefix.remove(model)
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = True) -> nn.Module:
    """Merge, then replace every wrapped layer by its base: a plain model again (weights stay frozen)."""
    merge(model, safe=safe)
    return _strip(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging them: the original base model."""
    for layer in peft_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return _strip(model)


# ----------------------------------------------------------------------------- files

def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter (not the base) as ``path``/adapter_config.json + adapter_model.safetensors."""
    config = peft_config(model)
    if config is None or not has_adapters(model):
        raise ValueError("model: has no adapters to save (apply() or load() one first)")
    method = METHODS[config.method]
    layers = peft_layers(model)
    cfg, tensors = method.to_peft(model, config, layers, HfNames(model, list(layers)))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        write_json(tmp / CONFIG_FILE, cfg)
        write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    return Path(path)


def load(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> PeftReport:
    """Apply the adapter saved in ``path`` (by nanomm or by peft) to ``model``, in place.

    ``trainable`` False leaves the adapter frozen too (peft's is_trainable=False): for inference.
    """
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"path: expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}, got {str(folder)!r}")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("peft_type") not in PEFT_TYPES:
        raise ValueError(f"{CONFIG_FILE}: peft_type {cfg.get('peft_type')!r} is not supported; expected one of "
                         f"{list(PEFT_TYPES)}")
    method = METHODS[PEFT_TYPES[cfg["peft_type"]]]
    config, values = method.from_peft(model, cfg, load_file(folder / WEIGHTS_FILE), HfNames(model))
    report = apply(model, config)
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(values))
    unknown = sorted(set(values) - set(own))
    shapes = [f"{n} {tuple(values[n].shape)} vs {tuple(own[n].shape)}" for n in values
              if n in own and values[n].shape != own[n].shape]
    if missing or unknown or shapes:
        unload(model)
        raise ValueError(f"{WEIGHTS_FILE}: does not fit the adapter built from {CONFIG_FILE}: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}, shape mismatches {shapes[:5]}")
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value.to(own[name].dtype))
    for p in own.values():
        p.requires_grad_(trainable)
    report.trainable = count_parameters(model)[0]
    return report
