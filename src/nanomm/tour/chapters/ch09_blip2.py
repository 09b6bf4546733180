"""Chapter 9: BLIP-2 — what is frozen, what trains, in how many stages.

Counts come from nanomm's BLIP-2 with OPT-2.7B and EVA ViT-g/14 built on the meta device (shapes, no
memory); the freezing itself is shown by one optimizer step of each stage on a tiny BLIP-2.
"""

from __future__ import annotations

import torch

from nanomm.models.blip2 import STAGES, Blip2, set_stage
from nanomm.models.multimodal_config import multimodal_preset
from nanomm.models.qformer import count_qformer_params
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.objectives_blip2 import OBJECTIVES

ID = 9
TITLE = "BLIP-2"


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _counts() -> dict[str, int]:
    with torch.device("meta"):
        m = Blip2(multimodal_preset("blip2-opt-2.7b"))
    out = {"vit": _size(m.vision), "lm": _size(m.lm), "qformer": _size(m.qformer), "lm_proj": _size(m.lm_proj),
           "total": _size(m)}
    for stage in STAGES:
        out[f"{stage}_trainable"] = set_stage(m, stage)["trainable"]
    out["prefix_width"] = m.config.lm.dim
    out["n_query"] = m.config.qformer.n_query
    return out


def _one_step_each(ctx: TourContext) -> dict[str, float]:
    """Max |Δw| of each part after one AdamW step of each stage on a tiny BLIP-2 and random images."""
    torch.manual_seed(ctx.seed)
    model = Blip2(multimodal_preset("blip2-tiny"))
    g = torch.Generator().manual_seed(ctx.seed)
    ids = torch.randint(4, model.config.lm.vocab_size - 1, (4, 6), generator=g)
    ids[:, 0] = 2
    size = model.config.vision.image_size
    batch = {"pixel_values": torch.randn(4, 3, size, size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    out = {}
    for stage, objective in OBJECTIVES.items():
        set_stage(model, stage)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss, _ = objective(model, batch)
        loss.backward()
        opt.step()
        for part in ("vision", "lm", "qformer"):
            out[f"{stage}_max_change_{part}"] = max(float((p.detach() - before[n]).abs().max())
                                                    for n, p in model.named_parameters() if n.startswith(part + "."))
        model.zero_grad(set_to_none=True)
    return out


def _plot(ctx: TourContext, c: dict[str, int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = c["total"]
    stages = list(STAGES)
    trainable = [c[f"{s}_trainable"] / 1e6 for s in stages]
    frozen = [(total - c[f"{s}_trainable"]) / 1e6 for s in stages]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.barh(stages, frozen, color="#bbbbbb", label="frozen (ViT-g, OPT-2.7B, unused parts)")
    ax.barh(stages, trainable, left=frozen, color="#2a7", label="trainable")
    for i, t in enumerate(trainable):
        ax.text(frozen[i] + t + 30, i, f"{t:.1f}M", va="center", fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_title("BLIP-2 (OPT-2.7B): two stages, the Q-Former alone learns")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
    fig.tight_layout()
    path = ctx.plot_path("ch09_blip2_trainable")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    c = _counts()
    qc = multimodal_preset("blip2-qformer")
    q = count_qformer_params(qc)
    text_only = q["text_ffn"] + q["lm_head"] + (qc.vocab_size + qc.max_positions) * qc.dim
    steps = _one_step_each(ctx)
    claims = [
        Claim(
            claim="The image encoder and the LLM are frozen; only the Q-Former (and a projection) trains",
            notes="只训中间的\"桥梁\"：Q-Former；第二阶段：冻结 ViT + LLM，只训 Q-Former 和投影层",
            nanomm=(f"frozen: ViT-g/14 {c['vit']:,} and OPT-2.7B {c['lm']:,} parameters in both stages. One AdamW "
                    f"step of each stage on a tiny BLIP-2 moves the ViT by "
                    f"{max(steps['representation_max_change_vision'], steps['generative_max_change_vision']):.1e} "
                    f"and the LM by "
                    f"{max(steps['representation_max_change_lm'], steps['generative_max_change_lm']):.1e}, "
                    f"the Q-Former by up to {steps['generative_max_change_qformer']:.1e}"),
            verdict="holds",
            source="BLIP-2 (Li et al., 2023) §3; LAVIS blip2_opt.py (freeze_vit, OPT parameters frozen)",
        ),
        Claim(
            claim="Training has three stages",
            notes="【三阶段训练】(then lists two)",
            nanomm=(f"two: {' → '.join(STAGES)}. Stage 1 trains the Q-Former alone with ITC + ITM + ITG, no LLM "
                    f"attached; stage 2 feeds its {c['n_query']} outputs, projected to {c['prefix_width']}, to the "
                    f"frozen LLM and trains on the LM loss"),
            verdict="wrong",
            source="BLIP-2 §3.2 (representation learning) and §3.3 (generative learning)",
        ),
        Claim(
            claim="Only 188M parameters are trained (Q-Former + projection)",
            notes="参数高效：只训 188M（Q-Former + 投影），不动 ViT 和 LLM",
            nanomm=(f"188M is the Q-Former with its queries: {c['qformer']:,} (LAVIS code). Stage 1 trains "
                    f"{c['representation_trainable']:,} (the Q-Former, ITC/ITM heads, ln_vision); stage 2 drops the "
                    f"Q-Former's text-only parts ({text_only:,} in word/position "
                    f"embeddings, text FFNs and LM head) and adds the projection ({c['lm_proj']:,}): "
                    f"{c['generative_trainable']:,} ≈ 107M"),
            verdict="approx",
            source="BLIP-2 Table 1 (188M trainable); LAVIS Blip2Qformer / Blip2OPT",
        ),
    ]
    lines = [
        f"The bridge is small beside what it connects: {100 * c['generative_trainable'] / c['total']:.1f}% of "
        f"BLIP-2 OPT-2.7B's {c['total'] / 1e9:.2f}B parameters receive a gradient in stage 2. "
        "The notes' LLM list mixes OPT (decoder-only, as nanomm's GPT/LLaMA) and FlanT5 "
        "(encoder–decoder, where the projected queries go to the encoder); nanomm implements the decoder case.",
        "Captioning is generation from a soft prompt: `Blip2.caption` hands [W·Q ; <s>] to the shared "
        "`generate` as `inputs_embeds` and decodes with the KV cache.",
    ]
    demo = {k: float(v) for k, v in c.items()} | steps
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx, c)])
