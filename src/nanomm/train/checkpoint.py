"""Checkpoints that survive a kill at any instant and resume a run exactly.

Layout of ``run_dir/checkpoints/``:
    step-00000100/  model.safetensors      weights (tied tensors stored once)
                    optimizer.safetensors  every tensor of optimizer.state_dict()["state"]
                    state.json             step, param groups, data position, RNG states, scaler, extras
    latest                                 the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete; ``latest`` is then
replaced atomically. A process killed mid-save leaves at worst a temporary folder, which is ignored and
cleaned up: ``latest`` always names a complete checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

from nanomm.io import atomic_dir, write_json, write_safetensors, write_text

LATEST = "latest"


# ----------------------------------------------------------------------------- RNG and optimizer state

def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy and torch RNG states as (JSON-able dict, tensors)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return meta, {"rng.torch": torch.get_rng_state()}


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """optimizer.state_dict() -> (JSON part, tensors keyed "state.<param>.<name>")."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def join_optimizer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` and point ``latest`` at it.

    ``state`` is JSON-able (data position, scaler, metrics); ``tensors`` are extra tensors (master weights ...).
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    rng_meta, rng_tensors = rng_state()
    with atomic_dir(root / name) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        opt_meta, opt_tensors = split_optimizer_state(optimizer.state_dict()) if optimizer is not None else ({}, {})
        write_safetensors(tmp / "optimizer.safetensors", {**opt_tensors, **rng_tensors, **(tensors or {})})
        write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_meta, "state": state or {}})
    write_text(root / LATEST, name + "\n")
    return root / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``, or None. Removes leftovers of killed saves."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        return None
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    path = root / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"run_dir: {pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (strict) and optimizer state; returns (step, state, extra tensors)."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"model: checkpoint {path} does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
    if optimizer is not None:
        optimizer.load_state_dict(join_optimizer_state(meta["optimizer"], opt_tensors))
    if restore_rng:
        set_rng_state(meta["rng"], tensors)
    extra = {k: v for k, v in tensors.items() if not k.startswith(("state.", "rng."))}
    return meta["step"], meta["state"], extra
