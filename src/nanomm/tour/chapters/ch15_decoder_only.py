"""Chapter 15: why decoder-only; the KV cache — measured on nanomm's LLaMA, the rest sourced.

The notes give five reasons decoder-only models won. Two can be measured here: the KV cache (reuse of
past keys and values: same logits, less time, and what it costs in memory) and "training and inference
are one forward pass". The denser training signal of next-token prediction is counted with nanomm.data's
BERT masking rule. Scale and emergent abilities, task unification and the relative cost of
encoder-decoder inference are claims about large trained models: they are given their sources and
marked unverifiable.
"""

from __future__ import annotations

import copy
import time

import torch

from nanomm.data import n_predictions
from nanomm.io import atomic_path
from nanomm.models import build, preset
from nanomm.models.generation import generate
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 15
TITLE = "Why decoder-only; the KV cache"

PROMPT = 64  # prompt tokens before generation starts


def _timed_steps(model, ids: torch.Tensor, n: int, use_cache: bool):
    """Greedy generation with the wall time of every step (the forward that produced each token)."""
    stamps: list[float] = []
    start = time.perf_counter()
    out = generate(model, ids, max_new_tokens=n, use_cache=use_cache, output_logits=True,
                   on_token=lambda k, t: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)], out


def _kv_reuse(ctx: TourContext, model, m64, ids: torch.Tensor) -> tuple[Claim, dict[str, float], dict]:
    n = 32 if ctx.quick else 128
    marks = [m for m in (16, 32, 64, 128) if m < n] + [n]
    generate(model, ids, max_new_tokens=4)  # warm-up
    cached, a = _timed_steps(model, ids, n, True)
    uncached, b = _timed_steps(model, ids, n, False)
    diff32 = max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))
    # float64: cached and uncached differ only by summation order
    a64, b64 = (generate(m64, ids, max_new_tokens=16, use_cache=c, output_logits=True) for c in (True, False))
    diff64 = max(float((x - y).abs().max()) for x, y in zip(a64.logits, b64.logits))
    speedup = {m: sum(uncached[:m]) / sum(cached[:m]) for m in marks}
    claim = Claim(
        claim="Inference is efficient: the K and V computed for earlier tokens are reused (KV cache)",
        notes="推理更高效 • KV Cache：之前算过的 K、V 可以复用",
        nanomm=(f"llama-tiny, {PROMPT}-token prompt, greedy: same tokens with and without the cache "
                f"({bool(torch.equal(a.sequences, b.sequences))}), max |logit difference| {diff32:.1e} in float32, "
                f"{diff64:.1e} in float64; speed-up of the cache after "
                + ", ".join(f"{m} tokens {s:.1f}×" for m, s in speedup.items())
                + " (grows with length: each uncached step re-runs the whole prefix)"),
        verdict="holds",
        source="Pope et al. 2022, Efficiently Scaling Transformer Inference §2; any decoder with attention caches K/V",
    )
    demo = {f"cache_speedup_{m}_tokens": s for m, s in speedup.items()}
    demo |= {"cached_vs_uncached_max_logit_diff_f32": diff32, "cached_vs_uncached_max_logit_diff_f64": diff64,
             "ms_per_token_cached": 1e3 * sum(cached) / n, "ms_per_token_uncached": 1e3 * sum(uncached) / n}
    return claim, demo, {"cached": cached, "uncached": uncached}


def _kv_bytes_per_token(config, bytes_per_value: int) -> int:
    """2 (K and V) · layers · kv heads · head dim · bytes: what every cached token costs."""
    n_kv = getattr(config, "n_kv_head", config.n_head)
    return 2 * config.n_layer * n_kv * config.head_dim * bytes_per_value


def _kv_memory(model, ids: torch.Tensor) -> tuple[Claim, dict[str, float]]:
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    tensors = [t for t in (*cache.keys, *cache.values) if t is not None]
    measured = sum(t.numel() * t.element_size() for t in tensors) / cache.length  # bytes per cached token
    formula = _kv_bytes_per_token(model.config, next(model.parameters()).element_size())
    llama7b = preset("llama-7b")
    per_token = _kv_bytes_per_token(llama7b, 2)  # fp16
    full = per_token * llama7b.max_positions
    gqa = _kv_bytes_per_token(preset("llama-7b", n_kv_head=8), 2)
    claim = Claim(
        claim="The reuse is paid in memory: the cache holds K and V of every past token in every layer",
        notes="KV Cache：之前算过的 K、V 可以复用（内存代价未提及）",
        nanomm=(f"per token 2·layers·kv_heads·head_dim·bytes: LLaMA-7B (32·32·128, fp16) {per_token:,} B = "
                f"{per_token / 2**20:.2f} MiB, {full / 2**30:.2f} GiB for one sequence of {llama7b.max_positions} "
                f"tokens; with 8 kv heads (GQA) {gqa:,} B. Measured on llama-tiny's KVCache: {measured:,.0f} B per "
                f"token, formula {formula:,} B"),
        verdict="holds",
        source="Pope et al. 2022 §2 (KV cache size); Touvron et al. 2023 Table 2 (LLaMA-7B shape); "
               "Ainslie et al. 2023 (GQA)",
    )
    return claim, {"kv_bytes_per_token_llama7b_fp16": float(per_token), "kv_gib_llama7b_2048_tokens": full / 2**30,
                   "kv_bytes_per_token_llama7b_gqa8_fp16": float(gqa), "kv_bytes_per_token_tiny_measured": measured,
                   "kv_bytes_per_token_tiny_formula": float(formula)}


def _one_forward(m64, ids: torch.Tensor) -> tuple[Claim, dict[str, float]]:
    out = generate(m64, ids, max_new_tokens=12, output_logits=True)
    with torch.inference_mode():
        full = m64(out.sequences[:, :-1]).logits  # the training forward: the whole text at once
    steps = torch.stack(out.logits, dim=1)  # the predictions made while generating
    diff = float((full[:, -steps.shape[1]:] - steps).abs().max())
    claim = Claim(
        claim="Training and inference run the same forward pass",
        notes="工程统一 • 训练和推理是同一个 forward 流程",
        nanomm=(f"one causal forward over a generated text (how it is trained) gives the logits generation "
                f"produced step by step, max |difference| {diff:.1e} (float64); an encoder-decoder also runs one "
                f"decoder forward per step, but needs the encoder pass and cross-attention besides"),
        verdict="holds",
        source="Radford et al. 2018 §3.1 (causal LM objective); nanomm.models.gpt.DecoderLM serves both",
    )
    return claim, {"training_forward_vs_generation_max_diff_f64": diff}


def _signal() -> tuple[Claim, dict[str, float]]:
    T = 128
    mlm = int(n_predictions(torch.tensor([T]))[0])  # BERT's rule: 15% of the tokens, at most 20
    clm = T - 1  # every position predicts the next token, except the last
    claim = Claim(
        claim="Pretraining is simpler: predict the next token, no masking strategy",
        notes="预训练更简单 • 自回归 LM：预测下一个 token • 不需要 BERT 那种 mask 策略",
        nanomm=(f"and denser: in a {T}-token sequence the causal LM has a loss at {clm} positions ({clm / T:.0%}), "
                f"BERT's masked LM at {mlm} ({mlm / T:.0%}: 15%, capped at 20 predictions per sequence)"),
        verdict="holds",
        source="Devlin et al. 2019 §3.1, google-research/bert create_pretraining_data.py; Radford et al. 2018 §3.1",
    )
    return claim, {"loss_positions_causal_lm_of_128": float(clm), "loss_positions_mlm_of_128": float(mlm)}


UNVERIFIABLE = [
    Claim(claim="Scale: GPT-3 shows larger models have stronger emergent abilities; decoder-only stacks "
                "parameters more easily",
          notes="规模效应更明显 • GPT-3 证明：参数越大，涌现能力越强 • Decoder-only 更容易堆参数",
          nanomm="not measurable on a CPU: needs trained models across scales. Emergence itself is contested as a "
                 "property of the metric",
          verdict="unverifiable",
          source="Brown et al. 2020 (GPT-3, few-shot gains with scale); Wei et al. 2022, Emergent Abilities of LLMs; "
                 "Schaeffer et al. 2023, Are Emergent Abilities of LLMs a Mirage?"),
    Claim(claim="Every NLP task becomes generation, which suits decoder-only",
          notes="生成任务统一 • 几乎所有 NLP 任务都能转成生成",
          nanomm="not measured here; the text-to-text framing was shown first with an encoder-decoder (T5), and a "
                 "controlled comparison found decoder-only best for zero-shot after plain pretraining but "
                 "encoder-decoder best after multitask finetuning",
          verdict="unverifiable",
          source="Raffel et al. 2020 (T5); Wang et al. 2022, What Language Model Architecture and Pretraining "
                 "Objective Work Best for Zero-Shot Generalization? (ICML)"),
    Claim(claim="Encoder-decoder cross-attention makes inference more complex",
          notes="Encoder-Decoder 的 cross-attention 更复杂",
          nanomm="not measured here; an encoder-decoder caches too: decoder self-attention K/V grow per step as "
                 "above, cross-attention K/V of the encoder output are computed once and reused",
          verdict="unverifiable",
          source="Vaswani et al. 2017 §3.2.3; transformers' EncoderDecoderCache"),
]


def _running_median(xs: list[float], width: int = 9) -> list[float]:
    half = width // 2
    return [float(torch.tensor(xs[max(0, i - half):i + half + 1]).median()) for i in range(len(xs))]


def _plot(ctx: TourContext, steps: dict) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key, color, label in (("uncached", "tab:red", "without KV cache"), ("cached", "tab:blue", "with KV cache")):
        ms = [1e3 * t for t in steps[key]]
        x = range(PROMPT + 1, PROMPT + len(ms) + 1)
        ax.plot(x, ms, color=color, lw=0.6, alpha=0.35)  # raw: a shared CPU adds spikes
        ax.plot(x, _running_median(ms), color=color, lw=1.8, label=f"{label} (running median of 9)")
    ax.set(xlabel="position of the generated token", ylabel="time of its step (ms)", yscale="log",
           title="llama-tiny greedy decoding, one CPU thread")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = ctx.plot_path("ch15_kv_cache")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    torch.manual_seed(ctx.seed)
    model = build(preset("llama-tiny")).eval()
    g = torch.Generator().manual_seed(ctx.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    claims, demo = [], {}
    m64 = copy.deepcopy(model).double()  # for the exactness checks
    reuse, numbers, steps = _kv_reuse(ctx, model, m64, ids)
    claims.append(reuse)
    demo |= numbers
    for claim, numbers in (_kv_memory(model, ids), _one_forward(m64, ids), _signal()):
        claims.append(claim)
        demo |= numbers
    claims += UNVERIFIABLE
    lines = [
        "Without a cache, step t re-runs all P + t tokens through every layer, so its time grows with the "
        "position; with the cache it feeds one token whose query reads the stored keys and values, and "
        "stays nearly flat (the plot). The logits are the same up to summation order.",
        "The price is memory linear in the length: half a MiB per token for LLaMA-7B in fp16, which is why "
        "grouped-query attention (fewer K/V heads) became standard. Benchmark against transformers' "
        "generate: `nanomm bench generate`.",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx, steps)])
