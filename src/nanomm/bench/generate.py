"""Benchmark: decoding with and without the KV cache, and nanomm's generate against transformers'.

A small LLaMA-like model with random weights (4 layers, width 256, 4 query / 2 key-value heads,
vocabulary 4096) generates greedily:
  kv_cache          one prompt of 32 tokens, N new tokens, cache on and off: tokens/s, the time of every
                    step (it grows with the position without the cache, stays flat with it), the largest
                    logit difference between the two runs, and their tokens (equal);
  vs_transformers   the same weights written with ``to_hf`` and loaded by ``LlamaForCausalLM``; one prompt,
                    and a batch of 4 left-padded prompts; both greedy for exactly N new tokens (no stop
                    token); tokens/s of each, best of a few runs, and whether the tokens are identical.

Timing runs on one CPU thread: the ratios are what count, and one thread keeps them stable when the
machine's cores are shared (with several threads, OpenMP workers waiting for a busy core dominate).
Goals: cache speed-up >= 5x at 256 new tokens; nanomm >= 1.0x transformers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from nanomm.io import atomic_path
from nanomm.models import LlamaConfig, build, to_hf
from nanomm.models.generation import generate

CONFIG = dict(vocab_size=4096, max_positions=1024, n_layer=4, n_head=4, n_kv_head=2, dim=256, ff_dim=688)
PROMPT_LENGTHS = (32, 27, 20, 11)  # the batch; the first alone is the single-prompt case
GOAL_CACHE_SPEEDUP, GOAL_VS_HF = 5.0, 1.0


def _prompts(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(PROMPT_LENGTHS):  # left padding: the last token of every row in the last column
        ids[b, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _step_times(model, ids: torch.Tensor, n: int, use_cache: bool):
    """Generate with per-step timestamps: step k's time is the forward that produced token k."""
    stamps = []
    start = time.perf_counter()
    out = generate(model, ids, max_new_tokens=n, use_cache=use_cache, output_logits=True,
                   on_token=lambda k, t: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return times, out


def _kv_cache(model, ids: torch.Tensor, n: int) -> dict:
    cached, a = _step_times(model, ids, n, True)
    uncached, b = _step_times(model, ids, n, False)
    diff = max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))
    checkpoints = sorted({c for c in (16, 64, 128, 256, n) if c <= n})
    return {
        "prompt_tokens": ids.shape[1], "new_tokens": n,
        "tokens_per_s_cached": n / sum(cached), "tokens_per_s_uncached": n / sum(uncached),
        "speedup": sum(uncached) / sum(cached),
        "speedup_at": {str(c): sum(uncached[:c]) / sum(cached[:c]) for c in checkpoints},
        "first_step_ms": {"cached": cached[0] * 1e3, "uncached": uncached[0] * 1e3},
        "last_step_ms": {"cached": cached[-1] * 1e3, "uncached": uncached[-1] * 1e3},
        "max_logit_diff": diff, "tokens_equal": bool(torch.equal(a.sequences, b.sequences)),
        "step_ms": {"cached": [t * 1e3 for t in cached], "uncached": [t * 1e3 for t in uncached]},
    }


def _vs_transformers(model, hf, ids: torch.Tensor, mask: torch.Tensor, n: int, repeats: int) -> list[dict]:
    import transformers

    gen_config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                                               pad_token_id=0, bos_token_id=None)
    rows = []
    for batch in (1, ids.shape[0]):
        x = ids[:batch, -PROMPT_LENGTHS[0]:] if batch == 1 else ids
        m = torch.ones_like(x) if batch == 1 else mask
        ours_t, theirs_t = [], []
        for _ in range(repeats):  # interleaved, so both see the same load on a shared machine
            t, ours = _timed(lambda: generate(model, x, m, max_new_tokens=n))
            ours_t.append(t)
            with torch.no_grad():
                t, theirs = _timed(lambda: hf.generate(x, attention_mask=m, generation_config=gen_config))
            theirs_t.append(t)
        same = ours.sequences.shape == theirs.shape and bool(torch.equal(ours.sequences, theirs))
        mismatch = None if same else int((ours.sequences != theirs[:, :ours.sequences.shape[1]]).any(0)
                                         .nonzero()[0]) - x.shape[1]
        rows.append({"batch": batch, "new_tokens": n,
                     "nanomm_tokens_per_s": batch * n / min(ours_t), "transformers_tokens_per_s": batch * n / min(theirs_t),
                     "nanomm_over_transformers": min(theirs_t) / min(ours_t), "tokens_equal": same,
                     "first_mismatch_step": mismatch})
    return rows


def _plot(kv: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key, color, label in (("uncached", "tab:red", "without KV cache"), ("cached", "tab:blue", "with KV cache")):
        ms = kv["step_ms"][key]
        x = range(1, len(ms) + 1)
        ax.plot(x, ms, color=color, lw=0.6, alpha=0.35)  # raw: a shared CPU adds spikes
        half = 4  # running median of 9 steps
        smooth = [float(torch.tensor(ms[max(0, i - half):i + half + 1]).median()) for i in range(len(ms))]
        ax.plot(x, smooth, color=color, lw=1.8, label=f"{label} ({kv[f'tokens_per_s_{key}']:.0f} tok/s)")
    ax.set(xlabel="new token", ylabel="time of its step (ms)", yscale="log",
           title=f"greedy decoding, prompt {kv['prompt_tokens']} tokens, one CPU thread")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _print(result: dict, console) -> None:
    from rich.table import Table

    kv = result["kv_cache"]
    t = Table(title=f"KV cache: one prompt of {kv['prompt_tokens']} tokens, {kv['new_tokens']} new tokens "
                    f"(model {result['model']}, 1 thread)")
    for col in ("new tokens so far", "speed-up with cache"):
        t.add_column(col, justify="right")
    for c, s in kv["speedup_at"].items():
        t.add_row(c, f"{s:.1f}×")
    console.print(t)
    console.print(f"tokens/s: cached {kv['tokens_per_s_cached']:.1f}, uncached {kv['tokens_per_s_uncached']:.1f}; "
                  f"max |logit difference| {kv['max_logit_diff']:.1e}; same tokens: {kv['tokens_equal']}")
    t = Table(title="nanomm generate vs transformers generate (greedy, same weights, best of runs)")
    for col in ("batch", "new tokens", "nanomm tok/s", "transformers tok/s", "ratio", "same tokens"):
        t.add_column(col, justify="right")
    for r in result["vs_transformers"]:
        t.add_row(str(r["batch"]), str(r["new_tokens"]), f"{r['nanomm_tokens_per_s']:.1f}",
                  f"{r['transformers_tokens_per_s']:.1f}", f"{r['nanomm_over_transformers']:.2f}×",
                  str(r["tokens_equal"]) + ("" if r["tokens_equal"] else f" (from step {r['first_mismatch_step']})"))
    console.print(t)
    verdict = {True: "met", False: "NOT met", None: "not measured (--quick)"}
    console.print("goals: " + ", ".join(f"{k}: {verdict[v]}" for k, v in result["goals_met"].items()))
    console.print(f"plot: {result['plot']}")


def run(quick: bool = False, out_dir: Path = Path("bench-out"), console=None) -> dict:
    """Measure; print rich tables when ``console`` is given; save a plot under ``out_dir``; return the figures."""
    import transformers

    n = 64 if quick else 256
    repeats = 3 if quick else 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build(LlamaConfig(**CONFIG)).eval()
        with tempfile.TemporaryDirectory() as d:
            to_hf(model, d)
            hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
        ids, mask = _prompts(CONFIG["vocab_size"])
        single = ids[:1, -PROMPT_LENGTHS[0]:]
        generate(model, single, max_new_tokens=4)  # warm-up: first calls pay for allocations
        kv = _kv_cache(model, single, n)
        vs = _vs_transformers(model, hf, ids, mask, n, repeats)
    finally:
        torch.set_num_threads(threads)
    result = {
        "model": "llama " + ", ".join(f"{k}={v}" for k, v in CONFIG.items()),
        "threads": 1, "torch": torch.__version__, "transformers": transformers.__version__,
        "kv_cache": kv, "vs_transformers": vs,
        "goals_met": {
            # the goal is stated at 256 new tokens; a quick run stops at 64, where it is not measured
            f"cache speed-up >= {GOAL_CACHE_SPEEDUP:g}x at 256 new tokens": None if quick else kv["speedup"] >= GOAL_CACHE_SPEEDUP,
            f"nanomm >= {GOAL_VS_HF:g}x transformers": all(r["nanomm_over_transformers"] >= GOAL_VS_HF for r in vs),
            "same tokens as transformers": all(r["tokens_equal"] for r in vs) and kv["tokens_equal"],
        },
    }
    result["plot"] = str(_plot(kv, Path(out_dir) / "generate.png"))
    if console is not None:
        _print(result, console)
    return result


if __name__ == "__main__":
    from rich.console import Console

    run(quick=True, console=Console())
