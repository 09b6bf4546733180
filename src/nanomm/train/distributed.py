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

import contextlib
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

from nanomm.train.memory_report import held_bytes, local_tensor, optimizer_tensors
from nanomm.train.trainer import BatchSource, Objective, TrainConfig, Trainer, evaluate, lr_at, make_optimizer

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


# ----------------------------------------------------------------------------- the strategies


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that answers attribute look-ups (model.config ...) from the wrapped module, as objectives expect."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class Strategy:
    """How one mode wraps the model, runs backward, steps and reports what a rank holds.
    ``setup`` returns (the module the objective calls, the MixedPrecision, the optimizer)."""

    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.grad_bytes = 0.0

    def configure(self, cfg: TrainConfig, rows: int, precision: str) -> TrainConfig:
        """Check the run against this mode before anything is built; return the TrainConfig to use."""
        return cfg

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.mp.autocast()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.mp.backward(loss / accum)

    def zero_grad(self) -> None:
        self.mp.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, grad_clip: float) -> tuple[float | None, bool]:
        """Unscale, clip, step; returns (gradient norm, or None on an fp16 overflow; overflow)."""
        self.grad_bytes = float(held_bytes(p.grad for p in self.module.parameters()))
        overflow = self.mp.unscale_()
        norm = None if overflow else float(torch.nn.utils.clip_grad_norm_(
            self.mp.parameters(), grad_clip if grad_clip > 0 else float("inf")))
        self.mp.step(self.optimizer)
        return norm, overflow

    def bytes_held(self) -> dict[str, float]:
        """weights, gradients (as after the last backward) and optimizer bytes this rank holds;
        fp32 masters count as optimizer state, as in ZeRO's K = 12."""
        masters = self.mp.parameters() if self.mp.separate else []
        return {"weights": float(held_bytes(self.module.parameters())), "gradients": self.grad_bytes,
                "optimizer": float(held_bytes([*optimizer_tensors(self._opt_state()), *masters]))}

    def _opt_state(self) -> dict:
        return self.optimizer.state

    def shards(self) -> Iterator[tuple[str, torch.Size, int, torch.Tensor]]:
        """(name, global shape, flat start, flat fp32 slice) of what this rank writes to its checkpoint shard.
        Replicated weights are written whole by rank 0 only."""
        if self.rank == 0:
            for name, p in self.mp.named_parameters():  # the fp32 masters
                yield name, p.shape, 0, p.detach().float().reshape(-1)

    def raw_model(self) -> nn.Module:
        return self.module


class DDPStrategy(Strategy):
    def setup(self, model: nn.Module, cfg: TrainConfig, precision: str):
        from nanomm.train.precision import MixedPrecision

        self.mp = MixedPrecision(model, precision)  # casts the model in place, keeps fp32 masters
        self.module = model
        # gradient_as_bucket_view: the gradients ARE the all-reduce buckets, not a second copy of them
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = _DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        self.optimizer = self._optimizer(cfg)
        return self.wrapped, self.mp, self.optimizer

    def _optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        return make_optimizer(self.mp.parameters(), cfg)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        # accumulate locally; all-reduce once, in the backward of the last micro-batch
        return contextlib.nullcontext() if last else self.wrapped.no_sync()


class ZeroOneStrategy(DDPStrategy):
    """DDP's all-reduced gradients, and torch's ZeroRedundancyOptimizer: each rank keeps Adam state for
    whole parameters totalling about 1/N of them, updates those, and broadcasts them to the others."""

    def _optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in make_optimizer(self.mp.parameters(), cfg).param_groups]
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2))

    def _opt_state(self) -> dict:
        return self.optimizer.optim.state  # this rank's partition only


class FSDPStrategy(Strategy):
    """FSDP2: every parameter cut into N row-chunks (DTensor Shard(0)); each block is gathered for its
    forward (and backward) and its gradients reduce-scattered, so each rank keeps 1/N of g and Adam state."""

    precisions = ("fp32", "bf16")

    def __init__(self, rank: int, world_size: int, device: torch.device, *, reshard_after_forward: bool):
        super().__init__(rank, world_size, device)
        self.reshard_after_forward = reshard_after_forward

    def setup(self, model: nn.Module, cfg: TrainConfig, precision: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from nanomm.train.precision import MixedPrecision, Fp32Policy, get_precision

        low = get_precision(precision).dtype
        policy = MixedPrecisionPolicy(param_dtype=None if low == torch.float32 else low, reduce_dtype=torch.float32)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # one FSDP group per block: the unit gathered before its forward and freed after (ZeRO-3) or kept
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        self.module = model
        self._autocast = (lambda: contextlib.nullcontext()) if low == torch.float32 else (lambda: Fp32Policy(low))
        self.mp = MixedPrecision(model, "fp32")  # the sharded fp32 parameters are the masters
        self.optimizer = make_optimizer(list(model.parameters()), cfg)
        return model, self.mp, self.optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast()

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss.float() / accum).backward()

    def step(self, grad_clip: float) -> tuple[float | None, bool]:
        self.grad_bytes = float(held_bytes(p.grad for p in self.module.parameters()))
        norm = torch.nn.utils.clip_grad_norm_(list(self.module.parameters()),
                                              grad_clip if grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reshard(self) -> None:
        """Free the gathered weights: a forward without backward (evaluation) leaves them gathered."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def bytes_held(self) -> dict[str, float]:
        self.reshard()
        return super().bytes_held()

    def shards(self) -> Iterator[tuple[str, torch.Size, int, torch.Tensor]]:
        self.reshard()
        for name, p in self.module.named_parameters():
            local = local_tensor(p.detach())
            rows = p.shape[0]
            chunk = -(-rows // self.world_size)  # torch.chunk's split: ceil(rows / N) rows per rank
            first = min(rows, self.rank * chunk)
            if local.shape[0] != max(0, min(rows, first + chunk) - first):
                raise RuntimeError(f"{name}: expected rows [{first}, {first + chunk}) of {rows} on rank {self.rank}, "
                                   f"got a local shard of {local.shape[0]} rows")
            if local.numel():
                yield name, p.shape, first * (p.numel() // rows), local.float().reshape(-1)


def _deepspeed(rank: int, world_size: int, device: torch.device, **kw: Any) -> Strategy:
    from nanomm.train.deepspeed_engine import DeepSpeedStrategy

    return DeepSpeedStrategy(rank, world_size, device, **kw)


# mode -> the strategy that runs it
MODES: dict[str, Callable[..., Strategy]] = {
    "ddp": DDPStrategy,
    "zero1": ZeroOneStrategy,
    "zero2": lambda r, w, d, **kw: FSDPStrategy(r, w, d, reshard_after_forward=False),
    "zero3": lambda r, w, d, **kw: FSDPStrategy(r, w, d, reshard_after_forward=True),
    "deepspeed": _deepspeed,
}

_ROWS = ("rows in its largest parameter (FSDP cuts every parameter by rows)",
         lambda ps: max(p.shape[0] if p.dim() else 1 for p in ps))
# what a mode cuts among the processes, and how many such pieces a model offers
SHARD_UNITS: dict[str, tuple[str, Callable[[list[nn.Parameter]], int]] | None] = {
    "ddp": None,
    "zero1": ("parameter tensors (ZeroRedundancyOptimizer gives each process whole tensors)", len),
    "zero2": _ROWS,
    "zero3": _ROWS,
    "deepspeed": ("parameter elements (DeepSpeed cuts one flat buffer)", lambda ps: sum(p.numel() for p in ps)),
}


def check_mode(mode: str, precision: str = "fp32", nproc: int = 1) -> None:
    """Reject an unknown mode, a precision the mode cannot run, or a process count below 1."""
    if mode not in MODES:
        raise ValueError(f"distributed: expected one of {sorted(MODES)}, got {mode!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected an integer >= 1, got {nproc!r}")
    allowed = ("fp32", "bf16", "fp16") if mode == "deepspeed" else \
        FSDPStrategy.precisions if mode in ("zero2", "zero3") else Strategy.precisions
    if precision not in allowed:
        why = " (FSDP here has no fp16 loss scaler; bf16 needs none)" if mode in ("zero2", "zero3") else ""
        raise ValueError(f"precision: expected one of {list(allowed)} with distributed={mode!r}{why}, got {precision!r}")


def check_shardable(model: nn.Module, mode: str, world_size: int) -> None:
    """Reject more processes than the mode can give a shard each."""
    check_mode(mode)
    unit = SHARD_UNITS[mode]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected at least one trainable parameter, got none")
    if unit is None:
        return
    what, count = unit
    n = count(params)
    if world_size > n:
        raise ValueError(f"nproc: {mode} shards the model's {what}, and this model has {n}, so at most {n} "
                         f"processes can each hold a shard; got nproc={world_size}")


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
