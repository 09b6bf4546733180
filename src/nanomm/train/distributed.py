"""Data-parallel training on N processes: plain DDP, ZeRO-1/2/3 (torch) and DeepSpeed, one trainer for all.

Every process holds a replica (or a shard) of the model and trains on its own slice of each global batch:

    global batch (B rows) ──► rank r takes rows [r·B/N, (r+1)·B/N)    so N × micro-batch = B
    local mean loss ─► backward ─► gradients averaged over the N ranks = the gradient of the global mean

so N processes take exactly the optimizer steps one process takes on batch B (the tests hold them equal).
What differs between the modes is what each rank keeps (Rajbhandari et al. 2020, ZeRO, §5):

    ddp        DistributedDataParallel: weights, gradients, Adam state all replicated; all-reduce of g
    zero1      ZeroRedundancyOptimizer: Adam state sharded (P_os); rank r updates its parameters, broadcasts
    zero2      FSDP2 fully_shard, reshard_after_forward=False: weights gathered once per step, g sharded
    zero3      FSDP2 fully_shard, reshard_after_forward=True: weights gathered per block, per pass (P_p)
    deepspeed  deepspeed.initialize with a ds_config.json (stage from its zero_optimization.stage)

``launch(build, out_dir, distributed=..., nproc=...)`` spawns the processes (gloo on CPU, nccl on GPU);
``build(**build_kwargs) -> Job`` is called in every process and must give the same job everywhere.
Checkpoints are sharded (every rank writes its own slices) and consolidated to one model.safetensors
(consolidate.py). DeepSpeed specifics (config arithmetic, its compiled ops) are in deepspeed_engine.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from nanomm.train.strategies import MODES, Strategy, check_mode, check_shardable
from nanomm.train.trainer import BatchSource, Objective, TrainConfig, Trainer, evaluate, lr_at

__all__ = ["Job", "LaunchResult", "MODES", "launch", "train_rank", "rank_result", "shard_batch", "RankSlice", "check_shardable",
           "check_mode", "DistributedTrainer", "Strategy", "init_process_group", "free_port"]


@dataclass
class Job:
    """What one process trains: built identically in every process by the launcher's ``build``."""

    model: nn.Module
    objective: Objective
    train_data: BatchSource  # yields the GLOBAL batch; each rank trains on its own slice of it
    cfg: TrainConfig
    val_data: Callable[[], Iterator[Any]] | None = None
    tokens_per_batch: Callable[[Any], int] | None = None


@dataclass
class LaunchResult:
    """What ``launch`` returns: rank 0's metric rows and what each rank held at the end."""

    history: list[dict[str, float]]
    state_bytes: list[dict[str, float]]  # per rank: weights, gradients, optimizer (bytes held by that rank)
    n_params: int
    run_dir: Path


# ----------------------------------------------------------------------------- each rank's slice of the data

def _leading(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else \
        [getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch) else []
    for item in items:
        rows = _leading(item)
        if rows is not None:
            return rows
    return None


def shard_batch(batch: Any, rank: int, world_size: int, device: torch.device | None = None) -> Any:
    """Rank ``rank``'s rows of a global batch: every tensor whose first dim is the batch size is cut into
    ``world_size`` equal slices (dicts, lists, tuples and dataclasses are walked; other leaves pass as is)."""
    rows = _leading(batch)
    if rows is None:
        raise ValueError("batch: expected at least one tensor with a batch dimension, got none")
    if rows % world_size:
        raise ValueError(f"batch: expected a global batch divisible by world_size={world_size} so every rank gets "
                         f"the same micro-batch, got {rows} rows")
    m = rows // world_size

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x[rank * m:(rank + 1) * m] if x.dim() and x.shape[0] == rows else x
            return x.to(device) if device is not None else x
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            parts = [cut(v) for v in x]
            return type(x)(*parts) if hasattr(x, "_fields") else type(x)(parts)  # a namedtuple takes fields
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: cut(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return x

    return cut(batch)


class RankSlice:
    """A BatchSource yielding this rank's slice of another source's global batches (same resumable position)."""

    def __init__(self, source: BatchSource, rank: int, world_size: int, device: torch.device | None = None):
        self.source, self.rank, self.world_size, self.device = source, rank, world_size, device

    def __iter__(self) -> "RankSlice":
        return self

    def __next__(self) -> Any:
        return shard_batch(next(self.source), self.rank, self.world_size, self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def global_batch_rows(source: BatchSource) -> int:
    """Rows of the source's next global batch, read without moving its position."""
    state = source.state_dict()
    rows = _leading(next(source))
    source.load_state_dict(state)
    if rows is None:
        raise ValueError("train_data: expected batches holding at least one tensor with a batch dimension, got none")
    return rows


# ----------------------------------------------------------------------------- the trainer on one rank

class DistributedTrainer(Trainer):
    """The shared Trainer on one rank: its slice of each batch, metrics averaged over ranks, the step of
    ``mode``, rank 0 alone writing logs; checkpoints sharded (consolidated at the end)."""

    def __init__(self, job: Job, mode: str, *, rank: int, world_size: int, out_dir: str | Path,
                 device: torch.device | None = None, precision: str = "fp32", ds_config: dict | None = None,
                 console: Any = None) -> None:
        check_mode(mode, precision, world_size)
        check_shardable(job.model, mode, world_size)
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.strategy = MODES[mode](rank, world_size, self.device, **({"ds_config": ds_config} if mode == "deepspeed" else {}))
        cfg = self.strategy.configure(job.cfg, global_batch_rows(job.train_data), precision)
        self.run_dir = Path(out_dir)
        val = None
        if job.val_data is not None:
            val = lambda: (shard_batch(b, rank, world_size, self.device) for b in job.val_data())  # noqa: E731
        super().__init__(job.model.to(self.device), job.objective, RankSlice(job.train_data, rank, world_size, self.device),
                         cfg, out_dir, val_data=val,
                         tokens_per_batch=job.tokens_per_batch, precision="fp32", console=console if rank == 0 else None)
        self.is_main = rank == 0  # every rank trains; rank 0 alone writes metrics and plots
        self.model, self.mp, self.optimizer = self.strategy.setup(job.model, cfg, precision)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def optimizer_step(self) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.step + 1, self.cfg)
        self.strategy.set_lr(lr)
        self.strategy.zero_grad()
        accum, sums, tokens = self.cfg.grad_accum, {"loss": 0.0}, 0
        for i in range(accum):
            batch = next(self.train_data)
            with self.strategy.no_sync(last=i == accum - 1):
                with self.strategy.autocast():
                    loss, metrics = self.objective(self.model, batch)
                self.strategy.backward(loss, accum)
            sums["loss"] += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            tokens += self.tokens_per_batch(batch) if self.tokens_per_batch else 0
        scale = self.mp.scale
        norm, overflow = self.strategy.step(self.cfg.grad_clip)
        out = {k: v / accum for k, v in self._mean_over_ranks({**sums, "tokens": tokens}).items()}
        out["tokens"] = round(out["tokens"] * accum * self.world_size)  # a sum over ranks, not a mean
        out["lr"] = lr
        if norm is not None:
            out["grad_norm"] = norm
        self.step += 1
        if self.mp.dtype != torch.float32:
            out.update(loss_scale=scale, skipped=float(overflow))
        return out

    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        local = evaluate(self.model, self.objective, self.val_data(), self.cfg.eval_batches, self.strategy.autocast)
        return self._mean_over_ranks(local)  # every rank holds an equal share of the batches

    def save(self) -> Path:
        """Every rank writes its own slices (checkpoints/step-N/shards/); the last save also consolidates them."""
        from nanomm.train.consolidate import save_sharded

        entries = list(self.strategy.shards())
        if self.rank == 0:  # persistent buffers are replicated: rank 0 writes them whole
            raw = self.strategy.raw_model()
            buffers = {n for n, _ in raw.named_buffers()}  # state_dict() keeps the persistent ones
            entries += [(n, b.shape, 0, b.detach().reshape(-1)) for n, b in raw.state_dict().items() if n in buffers]
        state = {"data": self.train_data.state_dict(), "history": self.history, "config": dataclasses.asdict(self.cfg),
                 "strategy": type(self.strategy).__name__}
        return save_sharded(self.run_dir, self.step, entries, state, rank=self.rank, world_size=self.world_size,
                            full=self.step == self.cfg.steps)

    def resume(self) -> bool:
        raise ValueError("resume: not supported for distributed runs yet; start a fresh out_dir, or resume "
                         "one process from the consolidated model.safetensors")


# ----------------------------------------------------------------------------- processes

def train_rank(job: Job, mode: str, *, rank: int, world_size: int, out_dir: str | Path, precision: str = "fp32",
               ds_config: dict | None = None, activation_checkpointing: bool = False, device: torch.device | None = None,
               console: Any = None) -> DistributedTrainer:
    """Train ``job`` as rank ``rank`` of an initialised process group; returns the trained DistributedTrainer
    (``.history``, ``.strategy.bytes_held()``, ``.n_params``)."""
    if activation_checkpointing:
        from nanomm.train.memory_report import checkpoint_blocks

        checkpoint_blocks(job.model)
    device = device or torch.device("cpu")
    with torch.no_grad():  # every rank starts from rank 0's weights, whatever each one's RNG did
        for t in [*job.model.parameters(), *job.model.buffers()]:
            moved = t.data.to(device)
            dist.broadcast(moved, src=0)
            t.data.copy_(moved)
    n_params = sum(p.numel() for p in job.model.parameters())
    trainer = DistributedTrainer(job, mode, rank=rank, world_size=world_size, out_dir=out_dir, device=device,
                                 precision=precision, ds_config=ds_config, console=console)
    trainer.n_params = n_params  # counted before sharding: a ZeRO-3 parameter's numel() is then 0
    trainer.fit()
    return trainer


def rank_result(trainer: DistributedTrainer) -> dict[str, Any]:
    """What a rank reports back to the launcher: metric rows, bytes held, parameter count."""
    return {"history": trainer.history, "state_bytes": trainer.strategy.bytes_held(), "n_params": trainer.n_params}


def _resolve(build: Callable[..., Job] | str) -> Callable[..., Job]:
    if callable(build):
        return build
    module, _, name = str(build).partition(":")
    if not name:
        raise ValueError(f"build: expected a callable or 'package.module:function', got {build!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def init_process_group(rank: int, world_size: int, port: int, backend: str | None = None,
                       timeout_s: float = 600.0) -> torch.device:
    """Join the group of ``world_size`` processes on this machine; returns this rank's device."""
    cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if cuda else "gloo")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # share the cores instead of each process spinning up one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _worker(rank: int, build: Callable[..., Job] | str, build_kwargs: dict, mode: str, world_size: int, port: int,
            out_dir: str, options: dict, queue: Any) -> None:
    device = init_process_group(rank, world_size, port, options.pop("backend"), options.pop("timeout_s"))
    try:
        torch.manual_seed(options.pop("seed"))
        job = _resolve(build)(**build_kwargs)
        if not isinstance(job, Job):
            raise TypeError(f"build: expected a function returning a nanomm.train.distributed.Job, got "
                            f"{type(job).__name__}")
        console = None
        if options.pop("progress") and rank == 0:
            from rich.console import Console

            console = Console()
        trainer = train_rank(job, mode, rank=rank, world_size=world_size, out_dir=out_dir, device=device,
                             console=console, **options)
        queue.put(("ok", rank, rank_result(trainer)))
    except (ValueError, TypeError) as e:  # a bad configuration: report it as itself, not as a crash
        queue.put(("error", rank, (type(e).__name__, str(e))))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(build: Callable[..., Job] | str, out_dir: str | Path, *, distributed: str = "ddp", nproc: int = 2,
           build_kwargs: dict | None = None, precision: str = "fp32", ds_config: str | Path | dict | None = None,
           activation_checkpointing: bool = False, backend: str | None = None, seed: int = 0,
           timeout_s: float = 600.0, progress: bool = False, start_method: str = "spawn") -> LaunchResult:
    """Train the job that ``build(**build_kwargs)`` returns on ``nproc`` processes of this machine.

    ``build`` must be importable by the child processes (a module-level function, or 'module:function').
    ``start_method="fork"`` (Linux, no CUDA initialised yet) skips re-importing torch in every child.
    The configuration (mode, precision, DeepSpeed batch arithmetic and stage) is checked here, before any
    process starts; what depends on the job (micro-batch, shard counts) in each process, before training.
    """
    check_mode(distributed, precision, nproc)
    ds = None
    if distributed == "deepspeed":
        from nanomm.train.deepspeed_engine import check_ds_config, load_ds_config

        ds = load_ds_config(ds_config)
        check_ds_config(ds, world_size=nproc, precision=precision)
    elif ds_config is not None:
        raise ValueError(f"ds_config: only used with distributed='deepspeed', got distributed={distributed!r}")
    _resolve(build)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing as mp

    context = mp.get_context(start_method)
    queue = context.SimpleQueue()
    options = dict(precision=precision, ds_config=ds, activation_checkpointing=activation_checkpointing,
                   backend=backend, timeout_s=timeout_s, seed=seed, progress=progress)
    mp.start_processes(_worker, args=(build, build_kwargs or {}, distributed, nproc, free_port(), str(out_dir),
                                      options, queue), nprocs=nproc, join=True, start_method=start_method)
    results: dict[int, dict] = {}
    while not queue.empty():
        status, rank, payload = queue.get()
        if status == "error":
            kind, message = payload
            raise {"ValueError": ValueError, "TypeError": TypeError}[kind](message)
        results[rank] = payload
    if sorted(results) != list(range(nproc)):
        raise RuntimeError(f"launch: expected a result from each of {nproc} processes, got ranks {sorted(results)}")
    return LaunchResult(history=results[0]["history"], state_bytes=[results[r]["state_bytes"] for r in range(nproc)],
                        n_params=results[0]["n_params"], run_dir=out_dir)
