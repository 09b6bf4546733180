"""Training throughput of nanomm's LLaMA against transformers' LlamaForCausalLM, one run, same everything.

Both models get the same config, the same initial weights (nanomm → to_hf → from_pretrained), the same
batches and the same AdamW. Steps alternate between the two so that a load change on the machine hits
both equally; the ratio of median step times is the figure. A check that the first losses agree proves
the two compute the same function. Peak memory of one step is measured for fp32 and bf16 (fp32 master
weights) through torch.profiler's allocator events (nanomm.bench.memory.peak_bytes).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nanomm.bench.memory import peak_bytes
from nanomm.io import write_json
from nanomm.models import build, preset, to_hf
from nanomm.train.objectives import causal_lm
from nanomm.train.precision import MixedPrecision

CONFIG = dict(vocab_size=4096, max_positions=256, n_layer=4, n_head=8, n_kv_head=4, dim=256, ff_dim=688)
BATCH, SEQ = 8, 128


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    return out


def _lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same loss code for both models, so that only the models differ."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())


def _stepper(model, loss_fn, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(batch):
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _nanomm_peak(precision: str, batch) -> int:
    torch.manual_seed(0)
    model = build(preset("llama-tiny", **CONFIG))
    mp = MixedPrecision(model, precision)
    opt = torch.optim.AdamW(mp.parameters(), lr=1e-3)

    def one_step():
        with mp.autocast():
            loss, _ = causal_lm(model, batch)
        mp.backward(loss)
        mp.step(opt)

    one_step()  # Adam state allocated, so the peak measured is a steady-state step
    return peak_bytes(one_step)


def run(quick: bool = False, out_dir: str | Path | None = None, console: Console | None = None) -> dict:
    from transformers import LlamaForCausalLM

    out_dir = Path("bench-out") if out_dir is None else Path(out_dir)
    steps, warmup = (6, 2) if quick else (20, 3)
    torch.manual_seed(0)
    ours = build(preset("llama-tiny", **CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(ours, tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ours.train(), theirs.train()
    batches = _batches(steps + warmup)
    step_ours = _stepper(ours, _lm_loss)
    step_theirs = _stepper(theirs, _lm_loss)
    times = {"nanomm": [], "transformers": []}
    first = {}
    for i, batch in enumerate(batches):
        for name, step in (("nanomm", step_ours), ("transformers", step_theirs)):
            start = time.perf_counter()
            loss = step(batch)
            if i == 0:
                first[name] = loss
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    tokens = BATCH * SEQ
    tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}
    peaks = {p: _nanomm_peak(p, batches[0]) for p in ("fp32", "bf16")}
    result = {
        "config": {**CONFIG, "batch": BATCH, "seq": SEQ, "steps_timed": steps, "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "tokens_per_s": tok_s,
        "nanomm_over_transformers": tok_s["nanomm"] / tok_s["transformers"],
        "first_loss": first,
        "first_loss_abs_diff": abs(first["nanomm"] - first["transformers"]),
        "peak_mib_one_step": {k: v / 2**20 for k, v in peaks.items()},
        "bf16_over_fp32_peak": peaks["bf16"] / peaks["fp32"],
    }
    write_json(out_dir / "train.json", result)
    if console is not None:
        table = Table(title=f"training step, LLaMA {CONFIG['n_layer']}×{CONFIG['dim']}, batch {BATCH}×{SEQ}, "
                            f"{torch.get_num_threads()} threads")
        for col in ("", "tokens/s", "× transformers"):
            table.add_column(col, justify="right")
        for name, v in tok_s.items():
            table.add_row(name, f"{v:,.0f}", f"{v / tok_s['transformers']:.2f}")
        console.print(table)
        console.print(f"first-step loss: nanomm {first['nanomm']:.6f}, transformers {first['transformers']:.6f}")
        console.print("peak memory of one step (nanomm): " +
                      ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks.items()) +
                      f" (bf16/fp32 = {result['bf16_over_fp32_peak']:.2f})")
    return result
