"""Chapter 12: BCE and InfoNCE by hand — where the notes' numpy versions break, and the stable forms.

The notes' two functions are transcribed below verbatim (numpy) and run beside nanomm.nn.losses.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nanomm.nn.losses import bce, bce_with_logits, info_nce
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 12
TITLE = "BCE and InfoNCE"


# ----------------------------------------------------------------------------- the notes' code

def notes_bce_loss(y_true, y_pred, eps=1e-7):
    """The notes' bce_loss (§12), line for line."""
    y_pred = np.clip(y_pred, eps, 1 - eps)
    return -np.mean(y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))


def notes_info_nce_loss(query, keys, temperature=0.07):
    """The notes' info_nce_loss (§12), line for line."""
    sim = query @ keys.T / temperature
    labels = np.arange(len(query))
    log_softmax = sim - np.log(np.sum(np.exp(sim), axis=1, keepdims=True))
    return -np.mean(log_softmax[np.arange(len(query)), labels])


def _quiet(fn, *args, **kw):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return float(fn(*args, **kw))


# ----------------------------------------------------------------------------- BCE

def _bce(g: torch.Generator) -> tuple[list[Claim], dict[str, float]]:
    p = torch.rand(256, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y = (torch.rand(256, generator=g) < 0.5).double()
    f64 = float((bce(p, y) - F.binary_cross_entropy(p, y)).abs())
    notes64 = abs(_quiet(notes_bce_loss, y.numpy(), p.numpy()) - float(bce(p, y)))

    one = np.float16(1 - 1e-7)  # what the clip's upper bound becomes in float16
    z = torch.tensor([12.0, 12.0], dtype=torch.float16)  # confident logits; σ(12) rounds to 1 in float16
    probs = torch.sigmoid(z)
    y_wrong, y_right = torch.tensor([0.0, 0.0], dtype=torch.float16), torch.tensor([1.0, 1.0], dtype=torch.float16)
    notes_wrong = _quiet(notes_bce_loss, y_wrong.numpy(), probs.numpy())
    notes_right = _quiet(notes_bce_loss, y_right.numpy(), probs.numpy())
    ours_wrong, ours_right = float(bce(probs, y_wrong)), float(bce(probs, y_right))
    logits_wrong, logits_right = float(bce_with_logits(z, y_wrong)), float(bce_with_logits(z, y_right))
    claims = [
        Claim(
            claim="BCE from sigmoid outputs, clipped to [eps, 1 − eps] with eps = 1e-7",
            notes="y_pred = np.clip(y_pred, eps, 1 - eps); -np.mean(y log p + (1-y) log(1-p))",
            nanomm=(f"float64: nanomm.bce − F.binary_cross_entropy = {f64:.1e}, the notes' code agrees to {notes64:.1e}. "
                    f"float16: 1 − 1e-7 rounds to {float(one)}, σ(12) = {float(probs[0])}: the notes' code gives "
                    f"{notes_wrong} (y = 0) and {notes_right} (y = 1), nanomm.bce the same ({ours_wrong}, {ours_right}); "
                    f"the logits form gives {logits_wrong:.4g} and {logits_right:.2g}"),
            verdict="approx",
            source="IEEE fp16 spacing below 1 is 2^-11 ≈ 4.9e-4; torch's BCEWithLogitsLoss (log-sum-exp form) "
                   "and autocast, which refuses binary_cross_entropy on fp16",
        ),
    ]
    # finiteness as 1/0 flags: the report is JSON, which has no inf or NaN
    demo = {"bce_f64_vs_torch": f64, "fp16_one_minus_eps": float(one),
            "fp16_notes_bce_finite": float(math.isfinite(notes_wrong) and math.isfinite(notes_right)),
            "fp16_bce_with_logits_wrong_label": logits_wrong, "fp16_bce_with_logits_right_label": logits_right}
    return claims, demo


# ----------------------------------------------------------------------------- InfoNCE

def _info_nce_formula(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    q, k = torch.randn(2, 16, 32, generator=g, dtype=torch.float64) * 0.2
    ours = info_nce(q, k, normalize=False)
    ce = F.cross_entropy(q @ k.T / 0.07, torch.arange(16))
    notes = _quiet(notes_info_nce_loss, q.numpy(), k.numpy())
    claim = Claim(
        claim="InfoNCE is the log-softmax of each row's diagonal entry (positives on the diagonal)",
        notes="log_softmax = sim - log Σ exp(sim); loss = -mean(log_softmax[i, i])",
        nanomm=(f"on small logits: info_nce − F.cross_entropy(sim, arange) = {abs(float(ours - ce)):.1e}; "
                f"the notes' code − info_nce = {abs(notes - float(ours)):.1e}"),
        verdict="holds",
        source="van den Oord et al. 2018 (CPC), Eq. 4",
    )
    return claim, {"info_nce_vs_cross_entropy": abs(float(ours - ce))}


def _overflow(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    # unnormalised 128-d embeddings, as an encoder outputs them: q·q ≈ 128, /0.07 ≈ 1800 ≫ 88
    q = torch.randn(16, 128, generator=g)
    k = torch.randn(16, 128, generator=g)  # unrelated keys: a large loss, but a finite one
    notes32 = _quiet(notes_info_nce_loss, q.numpy(), k.numpy())
    ours32 = float(info_nce(q, k, normalize=False))
    ref32 = float(F.cross_entropy(q @ k.T / 0.07, torch.arange(16)))
    big_q, big_k = q.double() * 9.0, k.double() * 9.0  # float64 logits in the thousands, past e^709
    top = float((big_q @ big_k.T).abs().max())
    notes64 = _quiet(notes_info_nce_loss, big_q.numpy(), big_k.numpy(), temperature=1.0)
    ours64 = float(info_nce(big_q, big_k, normalize=False, temperature=1.0))
    claim = Claim(
        claim="The hand-written InfoNCE is safe to use",
        notes="np.log(np.sum(np.exp(sim), axis=1))  # no max subtracted",
        nanomm=(f"128-d float32 embeddings, τ = 0.07: the notes' code gives {notes32}, nanomm {ours32:.6g} "
                f"(F.cross_entropy {ref32:.6g}); float64 logits up to {top:.0f}: notes {notes64}, nanomm {ours64:.6g}"),
        verdict="wrong",
        source="e^x overflows float32 past x ≈ 88.7 and float64 past 709.8; log-sum-exp subtracts the row max",
    )
    return claim, {"notes_info_nce_f32_finite": float(math.isfinite(notes32)), "info_nce_f32": ours32,
                   "info_nce_f64_large_logits": ours64}


def _cosine(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    q, k = torch.randn(2, 16, 32, generator=g, dtype=torch.float64) * 0.1
    notes1, notes10 = (_quiet(notes_info_nce_loss, (c * q).numpy(), k.numpy()) for c in (1.0, 10.0))
    cos1, cos10 = (float(info_nce(c * q, k)) for c in (1.0, 10.0))
    claim = Claim(
        claim="The similarity in InfoNCE is the cosine",
        notes="其中 sim = cosine similarity (§8); code: sim = query @ keys.T / temperature",
        nanomm=(f"the code uses raw dot products: scaling the queries by 10 moves its loss {notes1:.3f} → {notes10:.3f}; "
                f"with L2 normalisation (info_nce default) it stays {cos1:.3f} → {cos10:.3f}"),
        verdict="wrong",
        source="CLIP (Radford et al. 2021) Fig. 3: np.linalg.norm on both embeddings before the dot product",
    )
    return claim, {"notes_loss_scale1": notes1, "notes_loss_scale10": notes10, "cosine_loss_scale1": cos1,
                   "cosine_loss_scale10": cos10}


def _directions(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    img, txt = torch.randn(2, 16, 32, generator=g, dtype=torch.float64)
    txt = img + 1.5 * txt  # matched pairs, imperfectly
    i2t, t2i = float(info_nce(img, txt)), float(info_nce(txt, img))
    sym = float(info_nce(img, txt, symmetric=True))
    claim = Claim(
        claim="The §12 InfoNCE code is the CLIP loss of §8",
        notes="§8: L = (L_image + L_text) / 2; §12 code: one log-softmax over rows",
        nanomm=f"image→text {i2t:.4f}, text→image {t2i:.4f}, symmetric {sym:.4f}: the code computes only the first",
        verdict="approx",
        source="CLIP (Radford et al. 2021) Fig. 3: loss = (loss_i + loss_t) / 2",
    )
    return claim, {"info_nce_image_to_text": i2t, "info_nce_text_to_image": t2i, "info_nce_symmetric": sym}


def _temperature(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    q, k = torch.randn(2, 32, 16, generator=g, dtype=torch.float64)
    k = q + k
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T  # (32, 32)
    off = ~torch.eye(32, dtype=torch.bool)
    stats = {}
    for tau in (0.07, 1.0):
        p = torch.softmax(cos / tau, dim=-1)
        entropy = float(-(p * p.log()).sum(-1).mean())
        neg = torch.softmax((cos / tau).masked_fill(~off, -math.inf), dim=-1)  # gradient weights on negatives
        stats[tau] = (entropy, float(neg.max(-1).values.mean()))
    claim = Claim(
        claim="Small τ sharpens the distribution and focuses on hard negatives",
        notes="τ 小：分布更尖锐，对困难负样本更敏感；τ 大：分布更平滑",
        nanomm=(f"row entropy {stats[0.07][0]:.2f} nats at τ = 0.07 vs {stats[1.0][0]:.2f} at τ = 1 (max {math.log(32):.2f}); "
                f"share of the negatives' gradient on the hardest one: {stats[0.07][1]:.2f} vs {stats[1.0][1]:.2f}"),
        verdict="holds",
        source="Wang & Liu 2021, 'Understanding the Behaviour of Contrastive Loss', §3 (hardness-aware)",
    )
    return claim, {"entropy_tau_0.07": stats[0.07][0], "entropy_tau_1": stats[1.0][0],
                   "hardest_negative_share_tau_0.07": stats[0.07][1], "hardest_negative_share_tau_1": stats[1.0][1]}


def _plot_overflow(ctx: TourContext, g: torch.Generator):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, k = torch.randn(2, 16, 64, generator=g)  # unrelated pairs: the loss grows with the scale
    scales = np.logspace(-2, 1, 40)
    notes = [_quiet(notes_info_nce_loss, (s * q).numpy(), (s * k).numpy()) for s in scales]
    ours = [float(info_nce(s * q, s * k, normalize=False)) for s in scales]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.loglog(scales, ours, label="nanomm info_nce (log-sum-exp)", linewidth=3, alpha=0.6)
    ax.loglog(scales, [v if math.isfinite(v) else np.nan for v in notes], "o", markersize=3, label="notes' code (float32)")
    ax.set_xlabel("embedding scale (64-d, τ = 0.07, no L2 normalisation)")
    ax.set_ylabel("loss")
    ax.set_title("the notes' InfoNCE stops where e^(sim) overflows")
    ax.legend()
    fig.tight_layout()
    path = ctx.plot_path("ch12_info_nce_overflow")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    g = torch.Generator().manual_seed(ctx.seed)
    claims, demo = _bce(g)
    for claim, numbers in (_info_nce_formula(g), _overflow(g), _cosine(g), _directions(g), _temperature(g)):
        claims.append(claim)
        demo |= numbers
    lines = [
        "Both losses are right on paper and fragile in code. BCE from probabilities cannot survive float16: "
        "the clip bound 1 − 1e-7 is 1.0 there, so any saturated sigmoid gives log(0). "
        "`nanomm.nn.losses.bce_with_logits` works on logits: max(z, 0) − y·z + log(1 + e^(−|z|)).",
        "The notes' InfoNCE exponentiates raw similarities; unnormalised embeddings divided by τ = 0.07 overflow "
        "at once. `nanomm.nn.losses.info_nce` subtracts the row maximum, L2-normalises by default (the cosine the "
        "notes name) and does both directions when `symmetric=True` (CLIP, `clip_loss`).",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot_overflow(ctx, g)])
