"""Sharded checkpoints, and their consolidation into one model.safetensors that loads without any engine.

A sharded run never gathers the model to save it: each rank writes what it owns. Whatever the engine,
what a rank owns of a parameter is one contiguous range of its flattened (row-major) elements:

    replicated (DDP, ZeRO-1)   rank 0 writes [0, numel)
    FSDP2 Shard(0)             rows [r·⌈R/N⌉, (r+1)·⌈R/N⌉) = elements [r·⌈R/N⌉·C, ...) of an R×C tensor
    DeepSpeed ZeRO-1/2         the fragment of the parameter inside rank r's slice of the flat fp32 buffer
    DeepSpeed ZeRO-3           elements [r·P, (r+1)·P), P = ⌈numel/N⌉ (the last rank's tail is padding)

so one format serves all: ``shards/rank-RRRRR-of-NNNNN.safetensors`` holds, per parameter, its flat fp32
slice, and the file's metadata records (global shape, start). Consolidation (DeepSpeed's zero_to_fp32
idea) puts the slices of each parameter end to end, checks that they tile [0, numel) exactly, reshapes,
and writes model.safetensors. The masters are fp32, so the consolidated weights are the exact fp32
values the optimizer holds, even after bf16 training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open

from nanomm.io import atomic_dir, write_json, write_safetensors, write_text

__all__ = ["write_shard", "read_shards", "consolidate", "save_sharded", "SHARD_DIR", "shard_name"]

SHARD_DIR = "shards"
META_KEY = "nanomm.shards"
_NAME = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")


def shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def write_shard(folder: str | Path, rank: int, world_size: int,
                entries: Iterable[tuple[str, torch.Size, int, torch.Tensor]]) -> Path:
    """Write rank ``rank``'s slices: entries are (name, global shape, flat start, flat slice)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, index = {}, {}
    for name, shape, start, flat in entries:
        numel = torch.Size(shape).numel()
        if flat.dim() != 1 or not 0 <= start <= start + flat.numel() <= numel:
            raise ValueError(f"entries[{name!r}]: expected a 1-D slice inside [0, {numel}), got {tuple(flat.shape)} "
                             f"at start {start}")
        tensors[name] = flat.detach().cpu().contiguous()
        index[name] = {"shape": list(shape), "start": int(start)}
    path = folder / shard_name(rank, world_size)
    meta = {"rank": rank, "world_size": world_size, "tensors": index}
    write_safetensors(path, tensors, metadata={META_KEY: json.dumps(meta)})
    return path


def read_shards(folder: str | Path) -> dict[str, tuple[list[int], list[tuple[int, torch.Tensor]]]]:
    """name -> (global shape, [(start, flat slice), ...]) over every rank's file in ``folder``."""
    folder = Path(folder)
    files = sorted(folder.glob("rank-*-of-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"folder: expected rank-*-of-*.safetensors shard files in {folder}, found none")
    worlds = {int(_NAME.fullmatch(f.name).group(2)) for f in files if _NAME.fullmatch(f.name)}
    if len(worlds) != 1:
        raise ValueError(f"folder: expected the shards of one run, got files for world sizes {sorted(worlds)}")
    (world,) = worlds
    ranks = sorted(int(_NAME.fullmatch(f.name).group(1)) for f in files)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"folder: expected {world} shard files (ranks 0..{world - 1}), missing ranks {missing}")
    out: dict[str, tuple[list[int], list[tuple[int, torch.Tensor]]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            index = json.loads(handle.metadata()[META_KEY])["tensors"]
            for name, info in index.items():
                shape, pieces = out.setdefault(name, (info["shape"], []))
                if shape != info["shape"]:
                    raise ValueError(f"{name}: shape {info['shape']} in {f.name} differs from {shape} in another shard")
                pieces.append((info["start"], handle.get_tensor(name)))
    return out


def consolidate(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Join ``checkpoint/shards/`` into one full-tensor safetensors file (default checkpoint/model.safetensors)."""
    checkpoint = Path(checkpoint)
    full = {}
    for name, (shape, pieces) in read_shards(checkpoint / SHARD_DIR).items():
        numel = torch.Size(shape).numel()
        pieces.sort(key=lambda piece: piece[0])
        at = 0
        for start, flat in pieces:
            if start != at:
                kind = "overlap" if start < at else "gap"
                raise ValueError(f"{name}: the shards leave a {kind} at element {min(at, start)} of {numel}")
            at += flat.numel()
        if at != numel:
            raise ValueError(f"{name}: the shards cover {at} of its {numel} elements")
        full[name] = torch.cat([flat for _, flat in pieces]).reshape(shape)
    path = Path(out) if out is not None else checkpoint / "model.safetensors"
    write_safetensors(path, full)
    return path


def save_sharded(run_dir: str | Path, step: int, entries: list[tuple[str, torch.Size, int, torch.Tensor]],
                 state: dict[str, Any], *, rank: int, world_size: int, full: bool = False) -> Path:
    """Collective: every rank writes its entries under run_dir/checkpoints/step-N/shards/; rank 0 adds
    state.json (and model.safetensors when ``full``), then renames the folder into place and points
    ``latest`` at it, as nanomm.train.checkpoint does for one process."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(root / name) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            write_shard(tmp / SHARD_DIR, rank, world_size, entries)
            dist.barrier()  # every rank's shard is on disk
            if full:
                consolidate(tmp)
            write_json(tmp / "state.json", {"step": step, "world_size": world_size, "state": state})
        write_text(root / "latest", name + "\n")
    else:
        where: list[Any] = [None]
        dist.broadcast_object_list(where, src=0)
        write_shard(Path(where[0]) / SHARD_DIR, rank, world_size, entries)
        dist.barrier()
    dist.barrier()  # the folder is in place before anyone reads it
    return root / name
