"""Chapter 8: CLIP — symmetric InfoNCE on cosines with a learned, clipped temperature, then zero-shot.

The loss claims are checked on nanomm's CLIP itself: its logits against F.cross_entropy both ways,
its embeddings' norms, the gradient reaching the temperature, the clamp at 100. The live demo trains a
tiny CLIP on the procedural shapes for a few seconds (nanomm.train.recipes_clip) and classifies images
of colour–shape pairs it never saw together, by prompts alone.
"""

from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F

from nanomm.data.images import ShapesDataset, caption_tokenizer
from nanomm.models.clip import CLIP, zero_shot_probs, zero_shot_weights
from nanomm.models.vision_config import vision_preset
from nanomm.nn.losses import clip_loss
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.recipes_clip import prompts_for, load_clip, train_clip

ID = 8
TITLE = "CLIP"

PAPER = "Radford et al. 2021 (CLIP)"
# a CLIP small enough to train in seconds: colour is learned first, shape needs more steps
_MICRO = {"vision": {"n_layer": 1, "dim": 48, "ff_dim": 96, "n_head": 2},
          "text": {"n_layer": 1, "dim": 48, "ff_dim": 96, "n_head": 2}, "projection_dim": 32}
DEMO = {  # quick -> recipe arguments
    True: dict(steps=100, batch_size=64, n_train=480, lr=3e-3, eval_n=96, model_overrides=_MICRO),
    False: dict(steps=300, batch_size=64, n_train=1200, lr=3e-3, eval_n=240, model_overrides=_MICRO),
}


def _batch(model: CLIP, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = ShapesDataset("test", n=n, image_size=model.config.vision.image_size, seed=seed)
    enc = caption_tokenizer().encode_batch(ds.captions)
    return ds.images(), enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _loss_claims(model: CLIP, seed: int) -> tuple[list[Claim], dict[str, float]]:
    px, ids, mask = _batch(model, 16, seed)
    img, txt = model.encode_image(px, normalize=False), model.encode_text(ids, mask, normalize=False)
    logits = model(px, ids, mask).logits_per_image  # (16, 16)
    target = torch.arange(16)
    i2t, t2i = F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)
    ours = clip_loss(img, txt, model.logit_scale)
    sym_err = abs(float(ours - (i2t + t2i) / 2))
    scaled = clip_loss(10.0 * img, 0.1 * txt, model.logit_scale)  # cosine: the norms cannot matter
    norm_err = float((model.encode_image(px).norm(dim=-1) - 1).abs().max())
    claims = [
        Claim("CLIP's loss is symmetric InfoNCE: L = (L_image + L_text) / 2",
              "Loss = 图文对比 + 文图对比（对称）; L = (L_image + L_text) / 2",
              f"clip_loss − ½(CE(logits) + CE(logitsᵀ)) = {sym_err:.1e} on 16 pairs; the two directions "
              f"differ ({float(i2t):.4f} vs {float(t2i):.4f}), so both are needed",
              "holds", f"{PAPER}, Fig. 3: loss = (loss_i + loss_t)/2"),
        Claim("The similarity is the cosine",
              "其中 sim = cosine similarity",
              f"embeddings have unit norm (max |‖u‖ − 1| = {norm_err:.1e}); scaling image embeddings ×10 and "
              f"text ×0.1 changes the loss by {abs(float(scaled - ours)):.1e}",
              "holds", f"{PAPER}, Fig. 3: np.linalg.norm on both sides before np.dot"),
    ]
    return claims, {"symmetric_loss_error": sym_err, "loss_i2t": float(i2t), "loss_t2i": float(t2i),
                    "cosine_rescale_change": abs(float(scaled - ours)), "embedding_norm_error": norm_err}


def _temperature_claims(model: CLIP, seed: int) -> tuple[list[Claim], dict[str, float]]:
    px, ids, mask = _batch(model, 8, seed + 1)
    tau0 = 1.0 / math.exp(float(model.logit_scale.detach()))
    model.zero_grad()
    clip_loss(model.encode_image(px, normalize=False), model.encode_text(ids, mask, normalize=False),
              model.logit_scale).backward()
    grad0 = float(model.logit_scale.grad)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.zero_grad()
    clip_loss(model.encode_image(px, normalize=False), model.encode_text(ids, mask, normalize=False),
              model.logit_scale).backward()
    scale_hi, grad_hi = float(model.scale.detach()), float(model.logit_scale.grad)
    claims = [
        Claim("τ is a temperature, learned, initialised at 0.07",
              "τ 是温度",
              f"nanomm's CLIP starts at τ = 1/e^t = {tau0:.4f}; t is a parameter and gets a gradient "
              f"(∂L/∂t = {grad0:.3g} at init)",
              "holds", f"{PAPER} §2.5: τ learned as a log-parameterised multiplicative scalar, init 0.07"),
        Claim("The logit scale e^t is clipped at 100 (the notes leave this out)",
              "—",
              f"with t = log 1000 the scale is {scale_hi:g} and ∂L/∂t = {grad_hi:g}: past 100 t stops learning",
              "holds", f"{PAPER} §2.5: clipped to prevent scaling the logits by more than 100"),
    ]
    return claims, {"tau_init": tau0, "logit_scale_grad_init": grad0, "clipped_scale": scale_hi,
                    "clipped_scale_grad": grad_hi}


def _dimension_claim() -> tuple[Claim, dict[str, float]]:
    with torch.device("meta"):  # ViT-B/32 CLIP, shapes only
        model = CLIP(vision_preset("clip-vit-b-32"))
        img = model.encode_image(torch.empty(1, 3, 224, 224))
        txt = model.encode_text(torch.zeros(1, 77, dtype=torch.long), normalize=False)
    claim = Claim("Image and text vectors have the same dimension (e.g. 512)",
                  "图像和文本各一个向量，维度相同（如 512）",
                  f"CLIP ViT-B/32: image {tuple(img.shape)[1]}, text {tuple(txt.shape)[1]} after the projections "
                  f"(towers {model.config.vision.dim} and {model.config.text.dim} wide)",
                  "holds", f"{PAPER}, Table 19/20: embedding dimension 512 for ViT-B/32, 768 for ViT-L/14")
    return claim, {"clip_b32_embedding_dim": float(img.shape[1])}


def _similarity_plot(ctx: TourContext, model: CLIP, tok) -> tuple:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = ShapesDataset("test", n=40, image_size=model.config.vision.image_size, seed=ctx.seed + 5)
    pick, seen = [], set()
    for i, c in enumerate(ds.captions):  # eight images with different colour–shape pairs
        key = int(ds.labels["object"][i])
        if key not in seen and len(pick) < 8:
            pick.append(i)
            seen.add(key)
    enc = tok.encode_batch([ds.captions[i] for i in pick])
    with torch.no_grad():
        sim = model.encode_image(ds.images(pick)) @ model.encode_text(enc["input_ids"], enc["attention_mask"]).T
    fig, axes = plt.subplots(2, len(pick), figsize=(11, 6.5), gridspec_kw={"height_ratios": [1, 6]})
    for j, i in enumerate(pick):
        axes[0, j].imshow(ds.pixels[i])
        axes[0, j].axis("off")
    gs = axes[1, 0].get_gridspec()
    for ax in axes[1]:
        ax.remove()
    ax = fig.add_subplot(gs[1, :])
    im = ax.imshow(sim.numpy().T, cmap="viridis")
    ax.set_yticks(range(len(pick)), [ds.captions[i] for i in pick], fontsize=8)
    ax.set_xticks(range(len(pick)), [f"image {j}" for j in range(len(pick))], fontsize=8)
    for (r, c), v in zip([(r, c) for c in range(len(pick)) for r in range(len(pick))], sim.numpy().ravel()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("tiny CLIP after seconds of training: image (columns) × caption (rows)")
    fig.tight_layout()
    path = ctx.plot_path("ch08_clip_similarity")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    diag = float(sim.diag().mean())
    off = float((sim.sum() - sim.diag().sum()) / (sim.numel() - len(pick)))
    return path, {"similarity_diagonal_mean": diag, "similarity_off_diagonal_mean": off}


def _zero_shot_table(model: CLIP, tok, seed: int) -> list[str]:
    ds = ShapesDataset("heldout", n=4, image_size=model.config.vision.image_size, seed=seed + 7)
    w = zero_shot_weights(model, tok, ds.classes["object"], prompts_for(ds))
    probs = zero_shot_probs(model, ds.images(), w)
    rows = ["| held-out image | top-3 zero-shot prompts (probability) |", "|---|---|"]
    for i in range(len(ds)):
        top = probs[i].topk(3)
        guesses = ", ".join(f"{ds.classes['object'][int(k)]} ({float(p):.2f})" for p, k in zip(top.values, top.indices))
        rows.append(f"| {ds.classes['object'][int(ds.labels['object'][i])]} | {guesses} |")
    return rows


def run(ctx: TourContext) -> Chapter:
    torch.manual_seed(ctx.seed)
    tok = caption_tokenizer()
    fresh = CLIP(vision_preset("clip-tiny", text={"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                                                  "pad_token_id": tok.pad_id})).eval()
    claims, demo = _loss_claims(fresh, ctx.seed)
    more, numbers = _temperature_claims(fresh, ctx.seed)
    claims += more
    demo |= numbers
    claim, numbers = _dimension_claim()
    claims.append(claim)
    demo |= numbers

    with tempfile.TemporaryDirectory() as tmp:
        run_ = train_clip(tmp, data="shapes", seed=ctx.seed, warmup_steps=5, **DEMO[ctx.quick])
        model, tok, _ = load_clip(tmp)
    m = run_.metrics
    seen, held = m["seen_zero_shot_accuracy"], m["zero_shot_accuracy"]
    claims.append(Claim(
        "Zero-shot classification: class names become text, the most similar one wins",
        "零样本分类：把类别名变成文本，和图像算相似度",
        f"a tiny CLIP trained {m['seconds']:.0f} s: {seen:.0%} on new images of seen colour–shape pairs and "
        f"{held:.0%} on pairs never seen together (colour right {m['zero_shot_colour_accuracy']:.0%}), "
        f"chance {m['zero_shot_chance']:.1%} among 24 prompts",
        "holds" if seen > 2 * m["seen_zero_shot_chance"] else "approx",
        f"{PAPER} §3.1.2; prompt ensembling §3.1.4"))
    demo |= {k: float(v) for k, v in m.items()}
    plot, numbers = _similarity_plot(ctx, model, tok)
    demo |= numbers
    lines = [
        "Each batch of B pairs gives a B × B matrix of cosines scaled by e^t; the matching pairs are on the "
        "diagonal. The loss is cross-entropy along the rows (image → text) and down the columns (text → image), "
        "averaged: `nanomm.nn.losses.clip_loss`, used by `nanomm.train.objectives_clip.clip_objective`.",
        "A few seconds of training separate the colours first (the similarity plot: captions of one colour "
        "score alike); shapes, and pairs never seen together (below), need the text tower to compose words it has "
        "only seen apart, which takes minutes: `nanomm train clip` trains clip-tiny and reports the accuracy with "
        "its chance level beside it.",
        *_zero_shot_table(model, tok, ctx.seed),
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[plot])
