"""A tiny training job and a multi-mode worker for the distributed tests (importable by spawned processes).

Spawning processes and joining a process group costs seconds on a loaded 2-core machine, so the tests
spawn once and train every mode in the same pair of processes, one after the other.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nanomm.models import build, preset
from nanomm.train.distributed import Job, init_process_group, rank_result, train_rank
from nanomm.train.objectives import causal_lm
from nanomm.train.trainer import TrainConfig

GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 64


def tiny_config():
    # 2 blocks, GQA (4 query heads, 2 kv heads), SwiGLU, RoPE: every part of LLaMA, ~23k parameters
    return preset("llama-tiny", vocab_size=VOCAB, max_positions=16, n_layer=2, n_head=4, n_kv_head=2, dim=32,
                  ff_dim=64)


class RandomTokens:
    """Endless global batches of random token blocks; the position is the next batch index."""

    def __init__(self, rows: int = GLOBAL_BATCH, seed: int = 0):
        self.rows, self.seed, self.index = rows, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.index)
        self.index += 1
        ids = torch.randint(VOCAB, (self.rows, SEQ + 1), generator=g)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def train_config(**overrides) -> TrainConfig:
    base = dict(steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=1, grad_accum=2, eval_every=3, save_every=0,
                log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def tiny_job(rows: int = GLOBAL_BATCH, **cfg) -> Job:
    torch.manual_seed(0)
    val = RandomTokens(rows, seed=1)
    val_batches = [next(val), next(val)]
    return Job(build(tiny_config()), causal_lm, RandomTokens(rows), train_config(**cfg),
               val_data=lambda: iter(val_batches), tokens_per_batch=lambda b: b["input_ids"].numel())


def run_modes(rank: int, world_size: int, port: int, runs: list[dict], out_root: str, queue) -> None:
    """Train each run ({"name", "mode", optional "ds_config", "activation_checkpointing"}) in turn, in one
    process group; a failure surfaces as torch's ProcessRaisedException with this worker's traceback."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_process_group(rank, world_size, port, "gloo", timeout_s=300)
    try:
        for run in runs:
            trainer = train_rank(tiny_job(), run["mode"], rank=rank, world_size=world_size,
                                 out_dir=os.path.join(out_root, run["name"]), ds_config=run.get("ds_config"),
                                 activation_checkpointing=run.get("activation_checkpointing", False))
            queue.put((rank, run["name"], rank_result(trainer)))
    finally:
        dist.destroy_process_group()
