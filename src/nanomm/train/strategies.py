"""How each data-parallel mode keeps and updates the model on one rank: one small class per mode.

    ddp        DistributedDataParallel: everything replicated, gradients all-reduced
    zero1      torch's ZeroRedundancyOptimizer: Adam state sharded (P_os)
    zero2/3    FSDP2 fully_shard, reshard_after_forward False / True (P_os+g / P_os+g+p)
    deepspeed  deepspeed.initialize (deepspeed_engine.py)

A Strategy wraps the model, builds the optimizer, runs backward and the step, and lists the slices of
the weights its rank owns (for sharded checkpoints). ``MODES`` maps a mode's name to its strategy;
``check_mode`` and ``check_shardable`` reject what a mode cannot run, before any training.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from nanomm.train.memory_report import held_bytes, local_tensor, optimizer_tensors
from nanomm.train.trainer import TrainConfig, make_optimizer

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


