"""DeepSpeed as one of the distributed strategies: its config checked up front, its ops built once.

The notes' ds_config.json is accepted as it is:

    {"train_batch_size": 32, "gradient_accumulation_steps": 4, "fp16": {"enabled": true},
     "zero_optimization": {"stage": 2}}

DeepSpeed insists on one identity, checked here before any process trains:

    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size

The optimizer is nanomm's (``make_optimizer``: AdamW, decay on matrices only) passed to
``deepspeed.initialize`` as a client optimizer, and the learning rate follows TrainConfig's schedule, so a
DeepSpeed run takes the steps the other modes take; an "optimizer" or "scheduler" section is refused.

On CPU (``DS_ACCELERATOR=cpu``) DeepSpeed JIT-compiles a shared-memory communication op with g++ the
first time (minutes), under torch's extension folder (``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions). torch serialises that build with a lock *file*; a build killed half-way
leaves the file behind and every later run waits on it forever. ``prepare_ops`` builds under an OS lock
(released when its holder dies), removes lock files that no living process holds, and is a no-op once
the op is cached.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from nanomm.train.strategies import Strategy
from nanomm.train.memory_report import held_bytes, optimizer_tensors
from nanomm.train.trainer import TrainConfig, make_optimizer

__all__ = ["load_ds_config", "check_ds_config", "batch_rows", "ds_precision", "prepare_ops", "DeepSpeedStrategy",
           "STAGES"]

STAGES = (0, 1, 2, 3)
REFUSED = {"optimizer": "the optimizer is nanomm's AdamW (TrainConfig lr, beta1, beta2, weight_decay)",
           "scheduler": "the learning rate follows TrainConfig's warm-up + cosine schedule"}


def load_ds_config(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file or a dict (copied); None gives ZeRO stage 0 with defaults."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"ds_config: expected a JSON file or a dict, got {str(path)!r}, which does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"ds_config: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"ds_config: expected a JSON object in {path}, got {type(config).__name__}")
    return config


def _positive(config: dict, key: str) -> int | None:
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"ds_config[{key!r}]: expected an integer >= 1, got {value!r}")
    return value


def ds_precision(config: dict) -> str:
    """'fp16', 'bf16' or 'fp32', from the config's fp16/bf16 sections."""
    on = [name for name in ("fp16", "bf16") if isinstance(config.get(name), dict) and config[name].get("enabled")]
    if len(on) > 1:
        raise ValueError("ds_config: expected at most one of fp16.enabled and bf16.enabled, got both")
    return on[0] if on else "fp32"


def batch_rows(config: dict, world_size: int) -> int | None:
    """Rows of one global micro-step (what the data source must yield) = train_batch_size / accumulation."""
    tbs, gas = _positive(config, "train_batch_size"), _positive(config, "gradient_accumulation_steps") or 1
    return None if tbs is None else tbs // gas


def check_ds_config(config: dict, *, world_size: int, rows: int | None = None, grad_accum: int = 1,
                    precision: str = "fp32", cuda: bool | None = None) -> dict[str, Any]:
    """Check the config's arithmetic and return it completed for ``deepspeed.initialize``.

    ``rows`` is the global batch the data yields per micro-step (None: not known yet, in the launching
    process); ``grad_accum`` is TrainConfig's, used when the config does not set gradient_accumulation_steps.
    """
    config = copy.deepcopy(config)
    for key, why in REFUSED.items():
        if key in config:
            raise ValueError(f"ds_config[{key!r}]: not accepted, {why}; remove the section")
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"ds_config['zero_optimization']: expected an object, got {zero!r}")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"ds_config['zero_optimization']['stage']: expected one of {list(STAGES)}, got {stage!r}")

    tbs = _positive(config, "train_batch_size")
    micro = _positive(config, "train_micro_batch_size_per_gpu")
    gas = _positive(config, "gradient_accumulation_steps")
    if gas is not None and grad_accum != 1 and gas != grad_accum:
        raise ValueError(f"ds_config['gradient_accumulation_steps']: expected {grad_accum} like TrainConfig.grad_accum "
                         f"(or leave one of them unset), got {gas}")
    gas = gas or grad_accum
    if rows is not None:
        if rows % world_size:
            raise ValueError(f"batch: expected a global batch divisible by world_size={world_size}, got {rows} rows")
        if micro is not None and micro * world_size != rows:
            raise ValueError(f"ds_config['train_micro_batch_size_per_gpu']: expected {rows // world_size} "
                             f"(the data's {rows} rows per step over {world_size} processes), got {micro}")
        micro = rows // world_size
    if tbs is not None and micro is None and tbs % (gas * world_size):
        raise ValueError(f"ds_config['train_batch_size']: expected a multiple of gradient_accumulation_steps × "
                         f"world size = {gas} × {world_size} = {gas * world_size}, got {tbs}")
    if tbs is not None and micro is not None and tbs != micro * gas * world_size:
        raise ValueError(f"ds_config['train_batch_size']: expected micro-batch × gradient accumulation × world size "
                         f"= {micro} × {gas} × {world_size} = {micro * gas * world_size}, got {tbs}")

    wanted = ds_precision(config)
    if wanted == "fp32" and precision != "fp32":  # the config says nothing: the run's precision decides
        config[precision] = {"enabled": True}
        wanted = precision
    elif precision not in ("fp32", wanted):
        raise ValueError(f"precision: expected {wanted!r} like the DeepSpeed config (or 'fp32' to follow it), "
                         f"got {precision!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if wanted == "fp16" and not cuda and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        raise ValueError("ds_config['fp16']: DeepSpeed's CPU accelerator has no fp16 on this machine; "
                         "use {\"bf16\": {\"enabled\": true}} or run on a GPU")

    config["gradient_accumulation_steps"] = gas
    if micro is not None:
        config["train_micro_batch_size_per_gpu"] = micro
        config["train_batch_size"] = micro * gas * world_size
    config.setdefault("steps_per_print", 1 << 30)  # nanomm's trainer logs; keep DeepSpeed quiet
    return config


# ----------------------------------------------------------------------------- the compiled ops, built once

def _extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _held_open() -> set[str]:
    """Every file some living process has open (read from /proc; empty where there is no /proc)."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                held.add(os.readlink(fd))
        except OSError:
            continue  # the process ended, or is not ours to read
    return held


def remove_stale_locks(root: Path | None = None) -> list[Path]:
    """Delete torch extension lock files that no living process holds open (left by a killed build)."""
    root = root or _extensions_root()
    if not Path("/proc/self/fd").exists():
        return []
    held = _held_open()
    stale = [lock for lock in root.glob("**/lock") if str(lock.resolve()) not in held]
    for lock in stale:
        lock.unlink(missing_ok=True)
    return stale


def prepare_ops() -> None:
    """Select DeepSpeed's CPU accelerator where there is no GPU, and build (once) the op it loads at start."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = _extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "nanomm-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one builder at a time; the OS frees it if the holder dies
        remove_stale_locks(root)
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not builder.is_compatible():
            return
        if not any(root.glob(f"*/{builder.NAME}/{builder.NAME}.so")):
            print(f"DeepSpeed: compiling {builder.NAME} with g++ once (minutes); cached under {root}",
                  file=sys.stderr, flush=True)
        builder.load(verbose=False)


# ----------------------------------------------------------------------------- the strategy

class DeepSpeedStrategy(Strategy):
    """``deepspeed.initialize`` with nanomm's AdamW; DeepSpeed averages gradients over ranks and over the
    accumulation steps itself, clips to ``gradient_clipping``, and keeps its own fp32 masters."""

    def __init__(self, rank: int, world_size: int, device: torch.device, *, ds_config: dict | None = None):
        super().__init__(rank, world_size, device)
        self.ds_config = ds_config or {}

    def configure(self, cfg: TrainConfig, rows: int, precision: str) -> TrainConfig:
        self.config = check_ds_config(self.ds_config, world_size=self.world_size, rows=rows,
                                      grad_accum=cfg.grad_accum, precision=precision)
        self.config.setdefault("gradient_clipping", cfg.grad_clip)
        self.stage = self.config["zero_optimization"]["stage"]
        # the config's accumulation is the run's (the notes' file sets it): the trainer follows
        return dataclasses.replace(cfg, grad_accum=self.config["gradient_accumulation_steps"])

    def setup(self, model: nn.Module, cfg: TrainConfig, precision: str):
        prepare_ops()
        import deepspeed

        from nanomm.train.precision import MixedPrecision

        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        with contextlib.redirect_stdout(io.StringIO()):  # "... op built successfully", once per rank
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.module = model
        self.mp = MixedPrecision(model, "fp32")  # unused for stepping: DeepSpeed has its own masters
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(list(model.parameters()),
                                                       cfg), config=self.config)
        self.engine, self.optimizer = engine, optimizer
        return engine, self.mp, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself, and steps only at the boundary
        self.engine.backward(loss)
        self.engine.step()

    def zero_grad(self) -> None:
        pass  # the engine clears its gradients after each step

    def step(self, grad_clip: float) -> tuple[float | None, bool]:
        norm = self.engine.get_global_grad_norm()
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        return (None if norm is None else float(norm)), overflow

    def _fp32_partitions(self) -> list[torch.Tensor]:
        opt = self.engine.optimizer
        return list(getattr(opt, "single_partition_of_fp32_groups", None)
                    or getattr(opt, "fp32_partitioned_groups_flat", None) or [])

    def bytes_held(self) -> dict[str, float]:
        weights = [getattr(p, "ds_tensor", p) for p in self.module.parameters()]  # ZeRO-3: the local partition
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        # gradients live in DeepSpeed's private buckets, freed by the step: not measured here
        return {"weights": float(held_bytes(weights)),
                "optimizer": float(held_bytes([*optimizer_tensors(inner.state), *self._fp32_partitions()]))}

    def shards(self) -> Iterator[tuple[str, torch.Size, int, torch.Tensor]]:
        opt = self.engine.optimizer
        for name, p in self.module.named_parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3: rank r holds flat elements [r·P, (r+1)·P) of every parameter
                part = p.ds_tensor.numel()
                start = self.rank * part
                local = opt.get_local_fp32_param(p).reshape(-1)[:max(0, min(part, p.ds_numel - start))]
                if local.numel():
                    yield name, p.ds_shape, start, local.detach().float()
            elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: a fragment of the flat fp32 partition
                address = p._hp_mapping.lp_fragment_address
                yield name, p.shape, address.start, p._hp_mapping.get_hp_fragment().detach().float().reshape(-1)
            elif self.stage == 0 and self.rank == 0:
                yield name, p.shape, 0, p.detach().float().reshape(-1)

    def raw_model(self) -> nn.Module:
        return self.engine.module
