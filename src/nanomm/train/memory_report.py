"""The memory model put to work: an itemised table for a preset, and activation memory measured.

``memory_rows`` / ``print_memory_table`` give the bytes per device of a preset under ZeRO stage 0–3 on
N devices (nanomm.train.memory's formulas, nanomm.models.count_params' exact counts), full fine-tuning
or LoRA, plus the activation estimate of one micro-batch.

Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") keeps only
each block's input during the forward pass and recomputes the block's inside during backward:
``checkpoint_blocks(model)`` wraps every block of a nanomm decoder that way from outside (parameter
names unchanged). ``held_bytes`` counts what a process holds (a DTensor: its shard), which the
distributed tests set beside the ZeRO model. ``stored_activations`` measures what a forward pass leaves alive for backward: a
TorchDispatchMode sees every tensor created, weak references tell when its storage dies, and the bytes
still alive when the loss is computed are the stored activations (the peak includes the transients).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from nanomm.train.memory import GB, PRECISIONS, STAGES, activations, lora_params, model_states

__all__ = ["checkpoint_blocks", "local_tensor", "held_bytes", "optimizer_tensors", "LiveBytes", "stored_activations", "MemoryRow", "memory_rows", "print_memory_table",
           "LORA_TARGETS"]


# ----------------------------------------------------------------------------- activation checkpointing

def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute each of ``model.blocks`` in backward instead of storing its insides (in place; returns model).
    Only while gradients are recorded and no KV cache is passed: generation is unchanged."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model: expected a nanomm transformer with a non-empty `blocks` ModuleList, "
                         f"got {type(model).__name__}")
    for block in blocks:
        if getattr(block, "checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled() and kwargs.get("cache") is None:
                # non-reentrant: works with keyword arguments and with inputs that do not require grad
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward  # an instance attribute: the parameters keep their names
        block.checkpointed = True
    return model


# ----------------------------------------------------------------------------- what a rank holds

def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's own shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the tensors this process holds (a DTensor: its local shard), each view of a storage once."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor):
            t = local_tensor(t)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen and t.numel():
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def optimizer_tensors(state: dict) -> Iterator[Tensor]:
    """Every tensor of an optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq)."""
    for per_param in state.values():
        yield from (v for v in per_param.values() if isinstance(v, Tensor))


# ----------------------------------------------------------------------------- measuring live memory

class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode that are still alive: now and at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._alive: dict[int, int] = {}

    def _forget(self, key: int) -> None:
        self.now -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a view (a weight's transpose) or an in-place result lives in an input's storage: nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._alive and storage.nbytes() and storage.data_ptr() not in inputs:
                    self._alive[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._forget, key)
        return out


@dataclass
class ActivationBytes:
    stored: int  # alive when the forward pass ends, kept for backward (the output itself excluded)
    peak: int  # the most alive at any moment of forward + backward


def stored_activations(forward: Callable[[], Tensor]) -> ActivationBytes:
    """Run ``forward()`` (returning a tensor that requires grad), then backward of its sum, and measure."""
    with LiveBytes() as live:
        out = forward()
        stored = live.now - out.untyped_storage().nbytes()
        out.float().sum().backward()
    return ActivationBytes(stored=stored, peak=live.peak)


# ----------------------------------------------------------------------------- the table

# LoRA on the attention's query and value projections (Hu et al. 2021, §7.1; peft's default for LLaMA)
LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class MemoryRow:
    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def memory_rows(preset_name: str, gpus: int = 1, *, lora_r: int | None = None, precision: str = "mixed",
                seq_len: int | None = None, micro_batch: int = 1, activation_mode: str = "flash",
                stages: tuple[int, ...] = tuple(STAGES)) -> tuple[int, int, list[MemoryRow]]:
    """(parameters, trainable parameters, one row of bytes per device per ZeRO stage)."""
    from nanomm.models import count_params, preset

    config = preset(preset_name)
    n = count_params(config).total
    trainable = n
    if lora_r is not None:
        kv = getattr(config, "n_kv_head", config.n_head) * config.head_dim
        shapes = {"q_proj": (config.dim, config.dim), "v_proj": (config.dim, kv)}
        trainable = lora_params(config.n_layer, shapes, list(LORA_TARGETS), lora_r)
    seq_len = seq_len or config.max_positions
    act = activations(config.n_layer, config.dim, config.n_head, seq_len=seq_len, micro_batch=micro_batch,
                      mode=activation_mode)
    rows = []
    for stage in stages:
        items = model_states(n, stage=stage, n_devices=gpus, precision=precision, trainable=trainable).items
        rows.append(MemoryRow(stage, items["weights"], items["gradients"], items["optimizer"], act))
    return n, trainable, rows


def print_memory_table(preset: str, stage: int, gpus: int, lora_r: int | None = None, precision: str = "mixed",
                       seq_len: int | None = None, micro_batch: int = 1, activation_mode: str = "flash") -> None:
    """Print the bytes per device of ``preset`` at ZeRO ``stage`` on ``gpus`` devices, item by item, with every
    stage beside it for comparison (GB = 10⁹ bytes)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {sorted(STAGES)} (0 = plain data parallel), got {stage!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    n, trainable, rows = memory_rows(preset, gpus, lora_r=lora_r, precision=precision, seq_len=seq_len,
                                     micro_batch=micro_batch, activation_mode=activation_mode)
    b_w, b_g, k = PRECISIONS[precision]
    what = f"LoRA r={lora_r} on {'+'.join(LORA_TARGETS)}: {trainable:,} trainable" if lora_r else "full fine-tuning"
    table = Table(title=f"{preset}: {n:,} parameters, {what}; {precision} ({b_w} + {b_g} + K={k} B/param), "
                        f"{gpus} device(s)", box=box.SIMPLE_HEAD)
    table.add_column("GB per device", no_wrap=True)
    for row in rows:
        table.add_column(f"{'[bold]' if row.stage == stage else ''}ZeRO-{row.stage}" if row.stage else "DP",
                         justify="right", no_wrap=True)
    for item in ("weights", "gradients", "optimizer", "activations"):
        table.add_row(item if item != "activations" else f"activations ({activation_mode}, 1 micro-batch)",
                      *(f"{getattr(r, item) / GB:,.2f}" for r in rows))
    table.add_row("[bold]total", *(f"[bold]{r.total / GB:,.2f}" for r in rows))
    Console().print(table)
