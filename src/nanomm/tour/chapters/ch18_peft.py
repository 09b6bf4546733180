"""Chapter 18: PEFT — full fine-tuning, LoRA, prefix tuning, adapters and (IA)³ side by side, measured.

The same pretrained tiny LLaMA (chapter 10's) is fine-tuned five ways for the same number of steps on the
instruction set: what share of parameters trains, the peak memory of one training step (every CPU
allocation, ``nanomm.bench.memory.peak_bytes``), the held-out loss, and the inference time against the
untouched base, with the adapter merged where it can be. The notes' 112 GB for a 7B full fine-tune is
recomputed from LLaMA-7B's exact parameter count, and each method's share of LLaMA-7B is counted on the
meta device (shapes, no memory).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from nanomm import peft
from nanomm.bench.memory import peak_bytes
from nanomm.data.instructions import make_examples, prompt_batch
from nanomm.models import build, count_params, preset
from nanomm.peft.layer import peft_layers
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.tour.chapters.ch10_pretrain_sft_lora import TinyBase, quiet_config, tiny_base
from nanomm.train.memory import GB, model_states
from nanomm.train.recipes_finetune import PEFT_METHODS, MERGEABLE, apply_peft, run_steps, sft_trainer

ID = 18
TITLE = "PEFT: LoRA, prefix, adapter, IA3"

NAMES = {"none": "full fine-tune", "lora": "LoRA r=8, all-linear", "prefix": "prefix, P=8",
         "adapter": "adapters, m=16", "ia3": "(IA)³"}
# LLaMA-7B configurations for the parameter shares (the peft defaults people quote, and the notes' LoRA)
LLAMA7B_CONFIGS = {
    "LoRA r=8, q_proj + v_proj": peft.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "LoRA r=8, all-linear": peft.LoraConfig(r=8, alpha=16, target_modules="all-linear"),
    "(IA)³, k, v, down_proj": peft.IA3Config(),
    "prefix, P=20": peft.PrefixConfig(num_virtual_tokens=20),
    "adapters, m=64": peft.AdapterConfig(bottleneck=64),
}


def _forward_times(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Best of ``repeats`` timed forwards per model, the models taking turns (each leads a round in turn),
    so a busy moment of the machine slows them all alike rather than one.

    Subnormal floats are flushed to zero meanwhile: a trained model's sharp softmaxes produce exp() values
    below 1e-38, which x86 CPUs compute ~100× slower, and that would time the weights, not the method.
    """
    best = {name: float("inf") for name in models}
    flush = torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            for model in models.values():
                model.eval()(**batch)  # warm-up
            names = list(models)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    start = time.perf_counter()
                    models[name](**batch)
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return best


def _adapted(base: TinyBase, method: str, seed: int) -> tuple[nn.Module, dict[str, float]]:
    model = base.model()
    torch.manual_seed(seed)  # the adapter's own initialisation (LoRA's A, a prefix) is the same in every run
    return model, apply_peft(model, method)


def _method(base: TinyBase, method: str, steps: int, seed: int) -> tuple[dict, dict[str, nn.Module]]:
    """Train with ``method``; its measurements, and the models to time (unmerged, and merged if it can)."""
    tok = base.tokenizer
    train, heldout = make_examples("train", seed=seed), make_examples("heldout", seed=seed, limit=16)
    cfg = quiet_config(steps, PEFT_METHODS[method][1], seed)
    # the first optimizer step allocates gradients and Adam's two moments for the trainable parameters only
    probe, _ = _adapted(base, method, seed)
    peak = peak_bytes(sft_trainer(probe, tok, train, heldout, cfg, "unused", batch_size=16, seed=seed).optimizer_step)
    model, counts = _adapted(base, method, seed)
    trainer = sft_trainer(model, tok, train, heldout, cfg, "unused", batch_size=16, seed=seed)
    run_steps(trainer, steps)
    out = {**counts, "peak_step_bytes": float(peak), "val_loss": trainer.evaluate()["val_loss"]}
    timed = {f"{method}/unmerged": model}
    if method in MERGEABLE and method != "none":
        merged = peft.merge_and_unload(copy.deepcopy(model))
        out["merged_extra_params"] = float(sum(p.numel() for p in merged.parameters())
                                           - sum(v.numel() for v in base.state.values()))
        timed[f"{method}/merged"] = merged
    return out, timed


def _llama7b_shares() -> dict[str, peft.PeftReport]:
    model = build(preset("llama-7b"), device="meta")  # shapes only: 6.7B parameters, no memory
    out = {}
    for name, config in LLAMA7B_CONFIGS.items():
        out[name] = peft.apply(model, config)
        peft.unload(model)
    return out


def _placement(base: TinyBase) -> dict[str, list[str]]:
    """Which modules (IA)³ and the adapters wrap on the tiny LLaMA, by their last name."""
    out = {}
    for method in ("ia3", "adapter"):
        model = base.model()
        apply_peft(model, method)
        out[method] = sorted({n.split(".", 2)[-1] for n in peft_layers(model)})  # blocks.<i>.<rest>
        out[f"{method}_per_layer"] = len(peft_layers(model)) // len(model.blocks)
    return out


def run(ctx: TourContext) -> Chapter:
    base = tiny_base(ctx.quick, ctx.seed)
    steps, repeats = (30, 8) if ctx.quick else (300, 40)
    rows, models = {}, {"base": base.model()}
    for method in PEFT_METHODS:
        rows[method], timed = _method(base, method, steps, ctx.seed)
        models.update(timed)
    batch = prompt_batch(make_examples("heldout", seed=ctx.seed, limit=8), base.tokenizer)
    times = _forward_times(models, batch, repeats)
    for name, t in times.items():
        if name != "base":
            method, kind = name.split("/")
            rows[method][f"{kind}_time_ratio"] = t / times["base"]
    placement = _placement(base)
    shares = _llama7b_shares()
    n7b = count_params(preset("llama-7b")).total
    full_gb = model_states(n7b, precision="fp32").total / GB
    lora7b = shares["LoRA r=8, q_proj + v_proj"]
    lora_gb = model_states(n7b, precision="fp32", trainable=lora7b.trainable).total / GB
    share_text = "; ".join(f"{k} {v.percent:.3f}%" for k, v in shares.items())
    claims = [
        Claim(claim="7B full fine-tuning: 28 GB weights + 28 GB gradients + 56 GB Adam states = 112 GB+",
              notes="参数：7B × 4 bytes = 28GB • 梯度：28GB • 优化器状态：56GB • 总共：112GB+",
              nanomm=(f"16 B per parameter (4 + 4 + 8, fp32 Adam) × LLaMA-7B's {n7b:,} parameters = "
                      f"{full_gb:.1f} GB (the notes round 6.74B up to 7B); activations come on top"),
              verdict="approx",
              source="Rajbhandari et al. 2020 (ZeRO) §3.1; Touvron et al. 2023 (LLaMA-7B shape)"),
        Claim(claim="PEFT trains only 0.1%–1% of the parameters, so one GPU suffices",
              notes="PEFT 只训 0.1%~1% 参数，单卡可跑",
              nanomm=(f"LLaMA-7B: {share_text}. With LoRA on q, v the fp32 model states are {lora_gb:.1f} GB "
                      f"(frozen weights 4 B/param, gradients and Adam only for the adapter) instead of "
                      f"{full_gb:.1f} GB. The share depends on the config: (IA)³ is well below 0.1%"),
              verdict="approx",
              source="Hu et al. 2021; Liu et al. 2022 (T-Few, (IA)³); peft print_trainable_parameters"),
        Claim(claim="IA3 learns vectors that scale K, V and the FFN",
              notes="学习缩放向量，乘到 K、V、FFN 上 • 参数更少",
              nanomm=(f"IA3Config() on the tiny LLaMA wraps {placement['ia3']} in every layer: the outputs of k_proj "
                      f"and v_proj and the input of down_proj (the FFN's inner activation); "
                      f"{rows['ia3']['trainable_percent']:.2f}% of the tiny model, the fewest of the five"),
              verdict="holds",
              source="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
                     "In-Context Learning §3.3"),
        Claim(claim="Adapter: a small down-projection → ReLU → up-projection inserted after the FFN",
              notes="在 FFN 后插入小型适配层 • 结构：down projection → ReLU → up projection",
              nanomm=(f"Houlsby et al. put two adapters per layer, after the attention output and after the FFN, "
                      f"each with a skip connection; AdapterConfig() wraps {placement['adapter']} "
                      f"({placement['adapter_per_layer']} per layer), up-projection zero-initialised; the "
                      f"nonlinearity is a free choice (activation='relu' gives the notes' form)"),
              verdict="approx",
              source="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP, §2.1 and Fig. 2"),
        Claim(claim="Parameter share: LoRA 0.1–1%, Adapter 1–5%, Prefix 0.1%",
              notes="LoRA 0.1-1% | Adapter 1-5% | Prefix 0.1%",
              nanomm=(f"set by r, m and P, not by the method: LLaMA-7B {share_text}; the tiny model here: "
                      + ", ".join(f"{NAMES[m]} {r['trainable_percent']:.2f}%" for m, r in rows.items() if m != "none")),
              verdict="approx",
              source="peft's parameter counts for these configs (tested equal to nanomm's in tests/peft)"),
        Claim(claim="Inference overhead: LoRA can be merged (none); adapters and prefix add some",
              notes="推理开销：全量微调 无 | LoRA 可合并 | Adapter 有 | Prefix 有",
              nanomm=(f"forward time / base on {len(batch['input_ids'])} prompts (best of {repeats}): "
                      + ", ".join(f"{NAMES[m]} {r['unmerged_time_ratio']:.2f}×"
                                  + (f" (merged {r['merged_time_ratio']:.2f}×)" if "merged_time_ratio" in r else "")
                                  for m, r in rows.items())
                      + ". Merged, LoRA and (IA)³ are plain models again, no extra parameters; a prefix "
                        "lengthens every attention by P keys, an adapter adds two matmuls per sublayer"),
              verdict="holds",
              source="Hu et al. 2021 §4.1 (no additional inference latency); Houlsby et al. 2019; Li & Liang 2021"),
        Claim(claim="Quality: full fine-tuning best, LoRA close to it, adapters good, prefix slightly worse",
              notes="效果：全量微调 最好 | LoRA 接近全量 | Adapter 好 | Prefix 稍差",
              nanomm=(f"not a general ranking: a {steps}-step run of a 156k-parameter model on one synthetic task "
                      "cannot decide it. Measured held-out loss here: "
                      + ", ".join(f"{NAMES[m]} {r['val_loss']:.2f}" for m, r in rows.items())),
              verdict="unverifiable",
              source="Hu et al. 2021 Tables 2–5 (LoRA ≈ full on GLUE, WikiSQL, SAMSum); He et al. 2022, Towards a "
                     "Unified View of Parameter-Efficient Transfer Learning"),
    ]
    header = ["| method | trainable % | peak memory of one step | held-out loss | forward time vs base |",
              "|---|---|---|---|---|"]
    table = [f"| {NAMES[m]} | {r['trainable_percent']:.2f} | {r['peak_step_bytes'] / 2**20:.2f} MiB | "
             f"{r['val_loss']:.2f} | {r['unmerged_time_ratio']:.2f}×"
             + (f", merged {r['merged_time_ratio']:.2f}×" if "merged_time_ratio" in r else "") + " |"
             for m, r in rows.items()]
    lines = [f"Chapter 10's tiny LLaMA, {steps} steps of SFT each, batch 16, each method at its default learning "
             f"rate (`PEFT_METHODS`): full {PEFT_METHODS['none'][1]:g}, LoRA {PEFT_METHODS['lora'][1]:g}, prefix "
             f"{PEFT_METHODS['prefix'][1]:g}, adapters {PEFT_METHODS['adapter'][1]:g}, (IA)³ "
             f"{PEFT_METHODS['ia3'][1]:g}. Peak memory counts what one training step allocates (activations, "
             "gradients and, on the first step, Adam's moments); at this size activations dominate, so the "
             "PEFT saving is the gradient and optimizer share.", *header, *table]
    demo = {f"{m}_{k}": float(v) for m, r in rows.items() for k, v in r.items()}
    demo |= {"llama7b_full_finetune_gb": full_gb, "llama7b_lora_qv_gb": lora_gb,
             **{f"llama7b_percent {k}": v.percent for k, v in shares.items()}}
    return Chapter(claims=claims, demo=demo, lines=lines)
