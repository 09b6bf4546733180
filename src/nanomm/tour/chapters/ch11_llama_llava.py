"""Chapter 11: LLaMA vs LLaVA — a text-only decoder, and the same decoder given eyes.

LLaMA's sizes come from ``count_params``; LLaVA's from nanomm's LLaVA built on the meta device (v1:
CLIP ViT-L/14 at 224 px, linear projector; v1.5: ViT-L/14 at 336 px, two-layer GELU MLP). The demo
trains the projector alone (stage 1) on nanomm's shapes, once with each projector, behind the same
frozen tiny LLaMA.
"""

from __future__ import annotations

import torch

from nanomm.data.images import ShapesDataset
from nanomm.models.config import preset
from nanomm.models.llama import Llama
from nanomm.models.llava import PROJECTORS, Llava, set_stage
from nanomm.models.multimodal_config import LlavaConfig, multimodal_preset
from nanomm.models.params import count_params
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.objectives import causal_lm
from nanomm.train.objectives_llava import llava_lm

ID = 11
TITLE = "LLaMA vs LLaVA"

# LLaMA paper Table 2: the four sizes the notes list (7B, 13B, 33B, 65B)
LLAMA_SIZES = {"7B": {}, "13B": dict(n_layer=40, n_head=40, n_kv_head=40, dim=5120, ff_dim=13824),
               "33B": dict(n_layer=60, n_head=52, n_kv_head=52, dim=6656, ff_dim=17920),
               "65B": dict(n_layer=80, n_head=64, n_kv_head=64, dim=8192, ff_dim=22016)}


def _llama_claims() -> tuple[list[Claim], dict[str, float]]:
    tiny = Llama(preset("llama-tiny"))
    block = tiny.blocks[0]
    parts = (f"{type(block.norm1).__name__}, {type(block.mlp).__name__}, {tiny.positions.kind} positions, "
             f"biases: {any(n.endswith('bias') for n, _ in tiny.named_parameters())}")
    sizes = {k: count_params(preset("llama-7b", **v)).total for k, v in LLAMA_SIZES.items()}
    claims = [
        Claim(claim="LLaMA is a decoder-only LM with RoPE, RMSNorm and SwiGLU",
              notes="Decoder-only 架构；用 RoPE 位置编码、RMSNorm、SwiGLU",
              nanomm=f"nanomm's Llama block: {parts}; causal self-attention, untied head",
              verdict="holds", source="LLaMA (Touvron et al., 2023) §2.2"),
        Claim(claim="LLaMA comes in 7B / 13B / 33B / 65B",
              notes="7B / 13B / 33B / 65B 参数",
              nanomm=", ".join(f"{k}: {v:,}" for k, v in sizes.items()) + " (sizes are the paper's names, rounded)",
              verdict="holds", source="LLaMA Table 2 (6.7B, 13.0B, 32.5B, 65.2B)"),
    ]
    return claims, {f"llama_{k}_params": float(v) for k, v in sizes.items()}


def _llava_counts() -> dict[str, dict[str, int]]:
    out = {}
    for name in ("llava-7b", "llava-1.5-7b"):
        with torch.device("meta"):
            m = Llava(multimodal_preset(name))
        size = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        out[name] = {"vision": size(m.vision), "projector": size(m.projector), "lm": size(m.lm), "total": size(m),
                     "tokens": m.n_image_tokens, "pretrain": set_stage(m, "pretrain")["trainable"],
                     "finetune": set_stage(m, "finetune")["trainable"]}
    return out


def _llava_claims(c: dict[str, dict[str, int]]) -> list[Claim]:
    v1, v15 = c["llava-7b"], c["llava-1.5-7b"]
    q = multimodal_preset("blip2-qformer").n_query
    return [
        Claim(claim="LLaVA adds vision to LLaMA with CLIP's ViT",
              notes="在 LLaMA 基础上加视觉能力；用 CLIP 的 ViT 作为视觉编码器",
              nanomm=(f"LLaVA-1.5-7B = CLIP ViT-L/14-336 ({v15['vision']:,}) + projector ({v15['projector']:,}) + "
                      f"a 7B LLaMA-architecture LLM ({v15['lm']:,}) = {v15['total']:,}; the LLM is Vicuna (LLaMA "
                      f"fine-tuned on conversations), not LLaMA itself; features from the ViT's second-last layer"),
              verdict="approx", source="LLaVA (Liu et al., 2023) §4.1; LLaVA-1.5 (Liu et al., 2024)"),
        Claim(claim="A simple linear projection connects the visual features to the LLM",
              notes="用一个简单的线性投影层连接视觉特征和 LLM",
              nanomm=(f"LLaVA-1 only: W·Z + b, {v1['projector']:,} parameters (1024 → 4096). LLaVA-1.5 uses "
                      f"mlp2x_gelu, Linear → GELU → Linear, {v15['projector']:,}; nanomm picks either from "
                      f"PROJECTORS = {sorted(PROJECTORS)}"),
              verdict="approx", source="LLaVA Eq. 1; LLaVA-1.5 §3.2 (MLP cross-modal connector)"),
        Claim(claim="Stage 1 trains only the projection (ViT and LLM frozen), on 595K image–caption pairs",
              notes="第一阶段：只训投影层（冻结 ViT + LLM）；数据：595K 图文对",
              nanomm=f"stage 'pretrain': {v1['pretrain']:,} trainable parameters of {v1['total']:,} (LLaVA-1)",
              verdict="holds", source="LLaVA §4.2 (CC3M filtered to 595K pairs)"),
        Claim(claim="Stage 2 fine-tunes the LLM (ViT frozen), on 158K instructions",
              notes="第二阶段：微调 LLM（冻结 ViT）；数据：158K 指令数据",
              nanomm=(f"stage 'finetune' updates the projector too: {v1['finetune']:,} trainable = LLM "
                      f"{v1['lm']:,} + projector {v1['projector']:,}; only the ViT ({v1['vision']:,}) stays frozen"),
              verdict="approx", source="LLaVA §4.2 (\"update both the pre-trained weights of the projection "
                                       "layer and LLM\")"),
        Claim(claim="BLIP-2 compresses more: 32 tokens vs 256+",
              notes="BLIP-2 压缩更多：32 token vs 256+ token",
              nanomm=(f"image tokens in the LLM: LLaVA-1 {v1['tokens']}, LLaVA-1.5 {v15['tokens']} (patches, [CLS] "
                      f"dropped), BLIP-2 {q}"),
              verdict="holds", source="LLaVA §4.1; LLaVA-1.5; BLIP-2 §3.1"),
    ]


def _projector_demo(ctx: TourContext) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Stage 1 with each projector behind one frozen tiny LLaMA that first learned the captions' language."""
    from nanomm.train.recipes_vlm import IMAGE_TOKEN, QABatches, TextBatches, tower_states, vlm_tokenizer

    steps = 15 if ctx.quick else 60
    torch.manual_seed(ctx.seed)
    tok = vlm_tokenizer()
    base = multimodal_preset("llava-tiny")
    data = ShapesDataset("train", 64 if ctx.quick else 256, image_size=base.vision.image_size, seed=ctx.seed)
    config = LlavaConfig(vision=base.vision, lm=base.lm.replace(vocab_size=tok.vocab_size),
                         image_token_id=tok.token_to_id(IMAGE_TOKEN))
    lm = Llama(config.lm)
    _train(lm, causal_lm, TextBatches(data.captions, tok, 16, ctx.seed), steps)
    states = tower_states(Llava(config), data)  # one random frozen tower for both, run once
    curves = {}
    for name in PROJECTORS:
        torch.manual_seed(ctx.seed)
        model = Llava(config.replace(projector=name))
        model.lm.load_state_dict(lm.state_dict())
        set_stage(model, "pretrain")
        curves[name] = _train(model, llava_lm, QABatches(data, tok, 16, "caption", ctx.seed, states), steps)
    demo = {f"stage1_{k}_first_loss": v[0] for k, v in curves.items()}
    demo |= {f"stage1_{k}_last_loss": sum(v[-3:]) / 3 for k, v in curves.items()}
    return demo, curves


def _train(model: torch.nn.Module, objective, batches, steps: int) -> list[float]:  # noqa: ANN001
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = objective(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _plot(ctx: TourContext, curves: dict[str, list[float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = {"linear": "linear (LLaVA-1)", "mlp2x_gelu": "mlp2x_gelu (LLaVA-1.5)"}
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=labels[name])
    ax.set_xlabel("stage-1 step (projector only)")
    ax.set_ylabel("caption loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = ctx.plot_path("ch11_llava_projectors")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    claims, demo = _llama_claims()
    counts = _llava_counts()
    claims += _llava_claims(counts)
    demo |= {f"{m}_{k}": float(v) for m, row in counts.items() for k, v in row.items()}
    numbers, curves = _projector_demo(ctx)
    demo |= numbers
    lines = [
        "LLaVA is LLaMA with a prefix that is not words: every image patch becomes one more token, so the "
        "LLM's own attention does the fusion. Nothing inside the LLM changes; its input sequence does.",
        f"Stage 1 with a frozen tiny LLaMA on the shapes ({len(curves['linear'])} steps, projector only): caption "
        f"loss {numbers['stage1_linear_first_loss']:.2f} → {numbers['stage1_linear_last_loss']:.2f} with the "
        f"linear projector, {numbers['stage1_mlp2x_gelu_first_loss']:.2f} → "
        f"{numbers['stage1_mlp2x_gelu_last_loss']:.2f} with mlp2x_gelu. `nanomm train llava` runs both stages "
        "and measures question-answer accuracy.",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx, curves)])
