"""One training loop for every objective of nanomm.

An objective is a function ``(model, batch) -> (loss, metrics)``; a data source yields batches and can
save and restore its position. The loop does the rest, the same way for causal LM, MLM+NSP, SFT, DPO, CLIP:

    for step in 1..steps:
        lr ← warm-up then cosine(step)
        for each of grad_accum micro-batches:  (loss / grad_accum).backward()
        unscale (fp16/bf16: fp32 master weights); clip ‖g‖ to grad_clip; AdamW step, skipped on overflow
        every eval_every: validation loss; every save_every: atomic checkpoint

``resume=True`` restarts from the latest checkpoint with weights, optimizer, loss scaler, RNG states and
data position restored, so an interrupted run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nanomm.config import Config, option
from nanomm.io import write_json, write_text
from nanomm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanomm.train.precision import MixedPrecision

Objective = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]


class BatchSource(Protocol):
    """Where batches come from: an endless iterator with a resumable position."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig(Config):
    """How to train: optimisation, schedule, evaluation, checkpoints."""

    steps: int = option(1000, "optimizer steps in total")
    lr: float = option(3e-4, "peak learning rate, reached at the end of warm-up")
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "linear warm-up from 0 to lr over this many steps")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, applied to matrices only (not biases, norms)")
    beta1: float = option(0.9, "AdamW β1")
    beta2: float = option(0.95, "AdamW β2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    eval_every: int = option(100, "evaluate on the validation source every this many steps; 0 disables")
    eval_batches: int = option(10, "validation batches per evaluation")
    save_every: int = option(200, "checkpoint every this many steps (and at the end); 0 saves only at the end")
    log_every: int = option(10, "append a row to metrics.jsonl every this many steps")
    seed: int = option(0, "seed of torch, numpy and Python RNGs")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"lr, min_lr: expected 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps (step counts from 1)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim ≥ 2) only, as GPT-2/LLaMA training does."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class Trainer:
    """Trains ``model`` on ``objective`` over batches from ``train_data``; writes everything to ``out_dir``."""

    def __init__(self, model: torch.nn.Module, objective: Objective, train_data: BatchSource, cfg: TrainConfig,
                 out_dir: str | Path, *, val_data: Callable[[], Iterator[Any]] | None = None,
                 tokens_per_batch: Callable[[Any], int] | None = None, precision: str = "fp32",
                 loss_scale: Any = None, console: Console | None = None) -> None:
        self.model, self.objective, self.train_data, self.cfg = model, objective, train_data, cfg
        # fp16/bf16: the model is cast in place and the optimizer updates fp32 master copies
        self.mp = MixedPrecision(model, precision, loss_scale=loss_scale)
        self.out = Path(out_dir)
        self.val_data = val_data  # a fresh iterator over the validation batches on each call
        self.tokens_per_batch = tokens_per_batch
        self.console = console
        self.optimizer = make_optimizer(self.mp.parameters(), cfg)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.is_main = True  # False on ranks > 0 of a distributed run: they train, rank 0 writes

    # ------------------------------------------------------------------ pieces
    def _micro_step(self) -> tuple[float, dict[str, float], int]:
        batch = next(self.train_data)
        with self.mp.autocast():
            loss, metrics = self.objective(self.model, batch)
        self.mp.backward(loss / self.cfg.grad_accum)
        tokens = self.tokens_per_batch(batch) if self.tokens_per_batch else 0
        return float(loss.detach()), metrics, tokens

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        self.model.train()
        lr = lr_at(self.step + 1, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.mp.zero_grad()
        losses, tokens, sums = [], 0, {}
        for _ in range(self.cfg.grad_accum):
            loss, metrics, n = self._micro_step()
            losses.append(loss)
            tokens += n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        scale = self.mp.scale
        overflow = self.mp.unscale_()  # true fp32 gradients from here on
        out = {k: v / self.cfg.grad_accum for k, v in sums.items()}
        out.update(loss=sum(losses) / len(losses), lr=lr, tokens=tokens)
        if not overflow:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                self.mp.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")))
        self.mp.step(self.optimizer)  # skipped (weights and Adam state untouched) on overflow
        self.step += 1
        if self.mp.dtype != torch.float32:
            out.update(loss_scale=scale, skipped=float(overflow))
        return out

    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over cfg.eval_batches validation batches."""
        if self.val_data is None:
            return {}
        return evaluate(self.model, self.objective, self.val_data(), self.cfg.eval_batches, self.mp.autocast)

    def save(self) -> Path:
        mp = self.mp.state_dict()
        masters = {f"master.{k}": v for k, v in mp.pop("masters").items()}
        state = {"data": self.train_data.state_dict(), "history": self.history, "precision": mp,
                 "config": dataclasses.asdict(self.cfg)}
        return save_checkpoint(self.out, self.step, self.model, self.optimizer, state, masters)

    def resume(self) -> bool:
        """Restore the latest checkpoint of out_dir; False when there is none."""
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        self.step, state, tensors = load_checkpoint(path, self.model, self.optimizer)
        masters = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
        self.mp.load_state_dict({**state["precision"], "masters": masters})
        self.train_data.load_state_dict(state["data"])
        self.history = state["history"]
        self._write_metrics()
        return True

    def _write_metrics(self) -> None:
        if self.is_main:
            write_text(self.out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False) -> list[dict[str, float]]:
        self.out.mkdir(parents=True, exist_ok=True)
        if not (resume and self.resume()):
            torch.manual_seed(self.cfg.seed)
        progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=self.console is None, transient=False)
        start, tokens_seen = time.perf_counter(), 0
        with progress:
            task = progress.add_task("train", total=self.cfg.steps, completed=self.step, info="")
            while self.step < self.cfg.steps:
                row = self.optimizer_step()
                tokens_seen += row["tokens"]
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    row.update(self.evaluate())
                if self.step % max(1, self.cfg.log_every) == 0 or self.step == self.cfg.steps or "val_loss" in row:
                    self.history.append({"step": self.step, **row})
                    self._write_metrics()
                tok_s = tokens_seen / max(1e-9, time.perf_counter() - start)
                info = f"loss {row['loss']:.3f}" + (f" val {row['val_loss']:.3f}" if "val_loss" in row else "")
                progress.update(task, completed=self.step, info=info + (f" {tok_s:,.0f} tok/s" if tokens_seen else ""))
                if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or self.step == self.cfg.steps:
                    self.save()
        if self.is_main:
            write_json(self.out / "train_config.json", dataclasses.asdict(self.cfg))
            plot_losses(self.history, self.out / "loss.png")
        return self.history


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, batches: Iterator[Any], max_batches: int,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Mean of the objective's loss and metrics over at most ``max_batches`` batches, as ``val_*``."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        if n == max_batches:
            break
        with autocast():
            loss, metrics = objective(model, batch)
        for k, v in {"loss": float(loss), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train(was_training)
    return {f"val_{k}": v / max(1, n) for k, v in sums.items()}


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    """Training (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
