"""Hugging Face folders in and out: config.json + safetensors, mapped by a strict table of names.

    from_hf(dir) -> BertModel | BertForPreTraining | GPT | Llama   (model_type bert, openai-gpt, gpt2, llama)
    to_hf(model, dir)   writes config.json + model.safetensors that transformers loads

The name rules and config translations of each format are in ``hub_formats``. Loading is strict: a
checkpoint tensor no rule takes, a nanomm weight no tensor fills, or a shape mismatch is one error
that lists the names and shapes. Tied weights (BERT's MLM decoder, GPT's head) are written once; a
checkpoint that stores both copies must store equal ones.

Also read: sharded checkpoints (``*.index.json``), the sentence-transformers layout (``modules.json``,
weights without the ``bert.`` prefix, at the root or in ``0_Transformer/``), and legacy
``pytorch_model.bin`` through ``torch.load(weights_only=True)`` only: nothing is ever unpickled.
Files are written atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nanomm.models.bert import BertForPreTraining, BertModel
from nanomm.models.gpt import GPT
from nanomm.models.hub_formats import FAMILIES, Family
from nanomm.models.llama import Llama

__all__ = ["from_hf", "to_hf", "read_hf_weights", "resolve_hf_dir", "hf_format_of"]

_FORMATS: dict[type, Callable[[nn.Module], tuple[str, str]]] = {  # model -> (model_type, architecture)
    BertModel: lambda m: ("bert", "BertModel"),
    BertForPreTraining: lambda m: ("bert", "BertForPreTraining"),
    GPT: lambda m: ("openai-gpt", "OpenAIGPTLMHeadModel") if m.config.norm_placement == "post"
    else ("gpt2", "GPT2LMHeadModel"),
    Llama: lambda m: ("llama", "LlamaForCausalLM"),
}


def hf_format_of(model: nn.Module) -> tuple[str, str]:
    """(model_type, architecture) that ``to_hf`` writes for this model."""
    if type(model) not in _FORMATS:
        raise TypeError(f"model: expected one of {[t.__name__ for t in _FORMATS]}, got {type(model).__name__}")
    return _FORMATS[type(model)](model)


# ----------------------------------------------------------------------------- files

def resolve_hf_dir(path: str | os.PathLike) -> Path:
    """The folder holding config.json and the weights (sentence-transformers may nest it)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path: expected a directory with config.json and weights, got {str(root)!r}")
    modules = root / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("models.Transformer"):
                return root / module.get("path", "")
    if not (root / "config.json").is_file() and (root / "0_Transformer" / "config.json").is_file():
        return root / "0_Transformer"
    return root


def _load_bin(file: Path) -> dict[str, Tensor]:
    # legacy pickled checkpoints: tensors only, never arbitrary objects
    return torch.load(file, map_location="cpu", weights_only=True)


def _load_index(index: Path, reader: Callable[[Path], dict[str, Tensor]]) -> dict[str, Tensor]:
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(reader(index.parent / shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{index.name}: tensors listed in weight_map but absent from the shards: {missing[:20]}")
    return out


def read_hf_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a HF folder: (sharded) safetensors first, legacy pytorch_model.bin otherwise."""
    d = Path(folder)
    if (d / "model.safetensors.index.json").is_file():
        return _load_index(d / "model.safetensors.index.json", lambda f: load_file(f))
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        out: dict[str, Tensor] = {}
        for f in ([d / "model.safetensors"] if (d / "model.safetensors").is_file() else shards):
            out.update(load_file(f))
        return out
    if (d / "pytorch_model.bin.index.json").is_file():
        return _load_index(d / "pytorch_model.bin.index.json", _load_bin)
    if (d / "pytorch_model.bin").is_file():
        return _load_bin(d / "pytorch_model.bin")
    found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    raise FileNotFoundError(f"folder: no model.safetensors, *.safetensors or pytorch_model.bin in {str(d)!r}; "
                            f"found {found}")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- name mapping

def _our_prefix(model: nn.Module) -> str:
    return "bert." if isinstance(model, BertForPreTraining) else ""


def our_weights(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """nanomm tensors by name (without the model's own base prefix), and tied alias -> owner."""
    prefix = _our_prefix(model)
    strip = (lambda n: n[len(prefix):] if prefix and n.startswith(prefix) else n)
    weights: dict[str, Tensor] = {}
    owner_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner_of:
            aliases[strip(name)] = owner_of[id(p)]
        else:
            owner_of[id(p)] = strip(name)
            weights[strip(name)] = p
    persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
    for name, b in model.named_buffers():
        if name in persistent:
            weights[strip(name)] = b
    return weights, aliases


def _listing(title: str, items: list[str]) -> str:
    shown = items[:30] + ([f"... and {len(items) - 30} more"] if len(items) > 30 else [])
    return f"{title} ({len(items)}):\n  " + "\n  ".join(shown)


def map_in(family: Family, hf: dict[str, Tensor], model: nn.Module,
            origin: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Checkpoint tensors (names already normalised; ``origin`` maps them back for messages) ->
    nanomm tensors by name; strict."""
    origin = origin or {}
    weights, aliases = our_weights(model)
    rules = [(r, r.pattern()) for r in family.rules]
    ignore = [re.compile(p) for p in family.ignore]
    got: dict[str, list[tuple[str, Tensor]]] = {}
    unused, bad_shape, differ = [], [], []
    for name in sorted(hf):
        if any(p.match(name) for p in ignore):
            continue
        rule, match = next(((r, m) for r, p in rules if (m := p.match(name))), (None, None))
        targets = [o.format(i=match.groupdict().get("i")) for o in rule.ours] if rule else []
        if not rule or any(aliases.get(t, t) not in weights for t in targets):
            unused.append(f"{origin.get(name, name)} {tuple(hf[name].shape)}")
            continue
        for target, value in zip(targets, rule.load(hf[name])):
            got.setdefault(aliases.get(target, target), []).append((name, value))
    out = {}
    for target, values in got.items():
        src, value = values[0]
        if tuple(value.shape) != tuple(weights[target].shape):
            bad_shape.append(f"{origin.get(src, src)} {tuple(hf[src].shape)} -> {target} expects "
                             f"{tuple(weights[target].shape)}")
        elif any(not torch.equal(value, v) for _, v in values[1:]):
            differ.append(f"{target} <- {[origin.get(s, s) for s, _ in values]}")  # tied copies must agree
        out[target] = value
    missing = [f"{n} {tuple(t.shape)}" for n, t in weights.items() if n not in got]
    problems = [_listing(t, items) for t, items in (
        ("checkpoint tensors nanomm has no place for", unused), ("nanomm weights missing from the checkpoint", missing),
        ("shape mismatches", bad_shape), ("tied copies that differ", differ)) if items]
    if problems:
        raise ValueError(f"{family.model_type} checkpoint does not fit {type(model).__name__}:\n" + "\n".join(problems))
    return out


def _map_out(family: Family, model: nn.Module) -> dict[str, Tensor]:
    """nanomm weights -> HF names and layouts; every nanomm weight must find a rule."""
    weights, _ = our_weights(model)
    hf_prefix = "" if isinstance(model, BertModel) else family.base_prefix
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in (r for r in family.rules if r.write):
        for i in (range(model.config.n_layer) if "{i}" in rule.hf else [None]):
            names = [o.format(i=i) for o in rule.ours]
            if not all(n in weights for n in names):
                continue  # a part this model does not have (heads of a base model, a tied head)
            value = (rule.save or (lambda t: t))(*(weights[n].detach() for n in names))
            hf_name = rule.hf.format(i=i)
            if not hf_name.startswith(family.head_prefixes):
                hf_name = hf_prefix + hf_name
            out[hf_name] = value.to("cpu").contiguous().clone()
            used.update(names)
    left = [f"{n} {tuple(t.shape)}" for n, t in weights.items() if n not in used]
    if left:
        raise ValueError(_listing(f"nanomm weights with no {family.model_type} name", left))
    return out


# ----------------------------------------------------------------------------- public API

# model_type -> (reader, writer, nanomm class name) of families whose loader lives beside their model,
# as "module:function"; they reuse this module's strict name mapping (map_in, our_weights)
MULTIMODAL_LOADERS: dict[str, tuple[str, str, str]] = {
    "clip": ("nanomm.models.clip:clip_from_hf", "nanomm.models.clip:clip_to_hf", "CLIP"),
}


def _multimodal(target: str):
    import importlib

    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def from_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> nn.Module:
    """Load a local Hugging Face folder (BERT, GPT-2, LLaMA; sentence-transformers layout too)."""
    from nanomm.models import build  # the package imports this module lazily

    folder = resolve_hf_dir(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {str(folder)!r}")
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type in MULTIMODAL_LOADERS:
        return _multimodal(MULTIMODAL_LOADERS[model_type][0])(folder, dtype=dtype, device=device)
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; expected one of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    hf, origin = {}, {}
    for stored, t in read_hf_weights(folder).items():
        name = stored[len(family.base_prefix):] if stored.startswith(family.base_prefix) else stored
        for old, new in family.legacy.items():
            name = name.replace(old, new)
        hf[name], origin[name] = t, stored
    model = build(family.config_in(cfg, set(hf)), device=device)
    weights, _ = our_weights(model)
    with torch.no_grad():
        for name, value in map_in(family, hf, model, origin).items():
            weights[name].copy_(value)
    return model.to(dtype).eval()


def to_hf(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors), atomically."""
    for model_type, (_, writer, cls) in MULTIMODAL_LOADERS.items():
        if type(model).__name__ == cls:
            return _multimodal(writer)(model, path)
    model_type, architecture = hf_format_of(model)
    family = FAMILIES[model_type]
    tensors = _map_out(family, model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    first = next(iter(tensors.values()))
    cfg = {"model_type": family.model_type, "architectures": [architecture],
           **family.config_out(model.config), "dtype": str(first.dtype).removeprefix("torch.")}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    _atomic_write(folder / "config.json", lambda f: f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"))
    return folder
