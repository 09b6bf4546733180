"""Chapter 7: position encodings — equivariance, sinusoidal vs learned, ALiBi, RoPE and the notes' apply_rope.

Every figure is computed here from nanomm.nn.position and nanomm.nn.attention. The live demo trains
three one-head attention models (learned, sinusoidal, RoPE) for a second each on a lag-3 copy task at
length 32 and evaluates them at length 64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from nanomm.nn.attention import attention
from nanomm.nn.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope_complex,
    notes_apply_rope,
    permute_qk_weight,
    rope_inv_freq,
    sinusoidal_table,
)
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 7
TITLE = "Position encodings"


def _fmt_frac(x: float) -> str:
    return f"1/{round(1 / x)}" if x > 0 and abs(1 / x - round(1 / x)) < 1e-9 else f"{x:.4f}"


# ----------------------------------------------------------------------------- equivariance

def _self_attention(x: Tensor, w: Tensor) -> Tensor:
    q, k, v = (x @ w).chunk(3, dim=-1)  # (T, d) each
    return attention(q[None, None], k[None, None], v[None, None], backend="naive")[0, 0]  # (T, d)


def _equivariance(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    T, d = 12, 16
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 3 * d, generator=g, dtype=torch.float64) / math.sqrt(d)
    perm = torch.randperm(T, generator=g)
    out, out_p = _self_attention(x, w), _self_attention(x[perm], w)
    equi = float((out_p - out[perm]).abs().max())  # f(Px) vs P f(x)
    inv = float((out_p - out).abs().max())  # f(Px) vs f(x)
    pe = sinusoidal_table(T, d, dtype=torch.float64)
    with_pe = float((_self_attention(x[perm] + pe, w) - _self_attention(x + pe, w)[perm]).abs().max())
    claim = Claim(
        claim="Self-attention without positions is permutation invariant",
        notes="置换不变：打乱输入顺序，输出也只是打乱，不会变",
        nanomm=f"equivariant, not invariant: max|f(Px) − P·f(x)| = {equi:.1e}, max|f(Px) − f(x)| = {inv:.2f}; "
               f"with sinusoidal PE added max|f(Px+PE) − P·f(x+PE)| = {with_pe:.2f}",
        verdict="approx",
        source="the sentence describes equivariance (outputs permuted with the inputs); "
               "'invariant' would mean unchanged outputs",
    )
    return claim, {"equivariance_error": equi, "invariance_gap": inv, "equivariance_gap_with_pe": with_pe}


# ----------------------------------------------------------------------------- absolute encodings

def _sinusoidal_formula() -> tuple[Claim, dict[str, float]]:
    n, d = 128, 64
    table = sinusoidal_table(n, d, dtype=torch.float64).numpy()
    pos, col = np.arange(n)[:, None], np.arange(d)[None, :]
    angle = pos / 10000.0 ** ((col - col % 2) / d)  # the notes' formula, 2i = col rounded down to even
    formula = np.where(col % 2 == 0, np.sin(angle), np.cos(angle))
    err = float(np.abs(table - formula).max())
    # Vaswani's reason for it: PE(t + k) is a fixed rotation of PE(t), whatever t
    k = 5
    theta = k / 10000.0 ** (np.arange(0, d, 2) / d)
    c, s = np.cos(theta), np.sin(theta)
    sin_t, cos_t = table[:-k, 0::2], table[:-k, 1::2]
    rotated_sin, rotated_cos = sin_t * c + cos_t * s, cos_t * c - sin_t * s
    lin = float(max(np.abs(rotated_sin - table[k:, 0::2]).max(), np.abs(rotated_cos - table[k:, 1::2]).max()))
    claim = Claim(
        claim="Sinusoidal encoding: sin at even 2i, cos at odd 2i+1, wavelength 10000^(2i/d)",
        notes="PE(pos,2i)=sin(pos/10000^(2i/d)), PE(pos,2i+1)=cos(pos/10000^(2i/d))",
        nanomm=f"sinusoidal_table(128, 64) vs the formula: max diff {err:.1e}; PE(t+5) = R·PE(t) to {lin:.1e}",
        verdict="holds",
        source="Vaswani et al. 2017, §3.5",
    )
    return claim, {"sinusoidal_formula_max_diff": err, "sinusoidal_shift_is_rotation_err": lin}


def _learned_limit() -> Claim:
    emb = LearnedPositionalEmbedding(512, 8)
    try:
        emb(torch.tensor([512]))
        got = "position 512 accepted"
    except ValueError as e:
        got = f"position 512 raises: {e}"
    return Claim(
        claim="Learned positions cannot go past the trained maximum length",
        notes="可学习位置编码（BERT）…缺点：长度受限于训练时的最大长度",
        nanomm=f"LearnedPositionalEmbedding(512, d): {got}",
        verdict="holds",
        source="BERT (Devlin et al. 2019): 512 learned positions",
    )


# ----------------------------------------------------------------------------- extrapolation demo

VOCAB, WIDTH, TRAIN_LEN, LAG = 16, 32, 32, 3


class _OneHead(nn.Module):
    """Token embedding (+ absolute positions) → one causal attention head (+ RoPE) → vocabulary."""

    ABSOLUTE = {
        "learned": lambda: LearnedPositionalEmbedding(TRAIN_LEN, WIDTH),
        "sinusoidal": lambda: SinusoidalPositionalEmbedding(8 * TRAIN_LEN, WIDTH),
        "rope": lambda: None,
    }

    def __init__(self, kind: str):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = self.ABSOLUTE[kind]()
        self.rope = RotaryEmbedding(WIDTH) if kind == "rope" else None
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1])
        h = self.tok(ids) if self.pos is None else self.tok(ids) + self.pos(pos)  # (B, T, d)
        q, k, v = self.qkv(h)[:, None].chunk(3, dim=-1)  # (B, 1, T, d)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return self.out(attention(q, k, v, causal=True, backend="naive")[:, 0])  # (B, T, V)


def _copy_batch(g: torch.Generator, batch: int, length: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return ids, ids.roll(LAG, dims=1)  # target at t is the token at t − LAG (first LAG positions ignored)


def _train_and_eval(kind: str, steps: int, seed: int) -> Tensor:
    """Per-position accuracy at twice the training length (NaN past the table for learned)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _OneHead(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids, y = _copy_batch(g, 64, TRAIN_LEN)
        logits = model(ids)[:, LAG:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y[:, LAG:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    eval_len = TRAIN_LEN if kind == "learned" else 2 * TRAIN_LEN  # learned has no row 32
    with torch.no_grad():
        ids, y = _copy_batch(g, 256, eval_len)
        acc = (model(ids).argmax(-1) == y).float().mean(0)  # (eval_len,)
    full = torch.full((2 * TRAIN_LEN,), math.nan)
    full[:eval_len] = acc
    full[:LAG] = math.nan
    return full


def _extrapolation(ctx: TourContext) -> tuple[Claim, dict[str, float], list]:
    steps = 100 if ctx.quick else 250
    acc = {kind: _train_and_eval(kind, steps, ctx.seed) for kind in _OneHead.ABSOLUTE}
    inside = {k: float(a[LAG:TRAIN_LEN].mean()) for k, a in acc.items()}
    past = {k: float(a[TRAIN_LEN:].mean()) for k, a in acc.items() if k != "learned"}
    demo = {f"{k}_acc_len{TRAIN_LEN}": v for k, v in inside.items()}
    demo |= {f"{k}_acc_positions_{TRAIN_LEN}_to_{2 * TRAIN_LEN - 1}": v for k, v in past.items()}
    claim = Claim(
        claim="Sinusoidal extrapolates to longer sequences, but works worse than learned in practice",
        notes="优点：可外推到更长序列；缺点：实践中效果不如可学习",
        nanomm=(f"lag-{LAG} copy, trained at length {TRAIN_LEN}: accuracy learned {inside['learned']:.2f}, "
                f"sinusoidal {inside['sinusoidal']:.2f}; at positions {TRAIN_LEN}–{2 * TRAIN_LEN - 1}: "
                f"sinusoidal {past['sinusoidal']:.2f}, RoPE {past['rope']:.2f}, learned has no rows there"),
        verdict="wrong",
        source="Vaswani et al. 2017 Table 3 row (E): learned ≈ sinusoidal (BLEU 25.7 vs 25.8); "
               "Press et al. 2022 (ALiBi) Fig. 1: sinusoidal degrades soon past the training length",
    )
    return claim, demo, acc


def _plot_accuracy(ctx: TourContext, acc: dict[str, Tensor]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for kind, a in acc.items():  # learned drawn wide and underneath: the others cover it inside the length
        wide = kind == "learned"
        ax.plot(range(len(a)), a.numpy(), label=kind, marker="." if not wide else None,
                linewidth=5 if wide else 1.5, alpha=0.5 if wide else 1.0, zorder=1 if wide else 2)
    ax.axvline(TRAIN_LEN - 0.5, color="grey", linestyle="--", label="training length")
    ax.set_xlabel("position")
    ax.set_ylabel("accuracy")
    ax.set_title(f"lag-{LAG} copy: accuracy by position")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = ctx.plot_path("ch07_extrapolation")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- ALiBi

def _alibi() -> tuple[Claim, dict[str, float]]:
    slopes8 = alibi_slopes(8, dtype=torch.float64)
    slopes12 = alibi_slopes(12, dtype=torch.float64)
    causal = alibi_bias(slopes8, 6, 6)
    sym = alibi_bias(slopes8, 6, 6, symmetric=True)
    lower = torch.ones(6, 6).tril().bool()
    same_below = float((causal[:, lower] - sym[:, lower]).abs().max())
    above = float((causal[:, ~lower] - sym[:, ~lower]).abs().max())
    claim = Claim(
        claim="ALiBi adds −m·|i − j| to the score",
        notes="score_ij = q_i · k_j - m × |i - j|",
        nanomm=(f"the paper's causal bias −m·(i − j) equals −m·|i − j| wherever j ≤ i (max diff {same_below:g}); "
                f"|i − j| only matters above the diagonal (there up to {above:.2f}), i.e. the bidirectional variant. "
                f"Slopes, 8 heads: {', '.join(_fmt_frac(float(s)) for s in slopes8)}; "
                f"12 heads: {', '.join(f'{float(s):.3f}' for s in slopes12)}"),
        verdict="approx",
        source="Press et al. 2022, §3: causal bias, geometric slopes 2^(−8/n)…; non-power-of-two rule in their code",
    )
    return claim, {"alibi_slope_8_heads_first": float(slopes8[0]), "alibi_slope_8_heads_last": float(slopes8[-1])}


# ----------------------------------------------------------------------------- RoPE

def _rope_relative(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    D, trials = 64, 200
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    spread = 0.0
    for dtype in worst:
        rope = RotaryEmbedding(D, layout="interleaved")
        q, k = torch.randn(2, trials, D, generator=g, dtype=torch.float64)
        i, j, s = (torch.randint(0, 2048, (trials,), generator=g) for _ in range(3))

        def score(a, b):  # ⟨R(a) q, R(b) k⟩ for each trial, (trials,)
            rq = rope(q.to(dtype)[:, None, None, :].transpose(0, 2), a[None])[0, 0]
            rk = rope(k.to(dtype)[:, None, None, :].transpose(0, 2), b[None])[0, 0]
            return (rq * rk).sum(-1).double()

        base = score(i, j)
        worst[dtype] = float(((score(i + s, j + s) - base).abs() / (q.norm(dim=-1) * k.norm(dim=-1))).max())
        if dtype == torch.float64:
            spread = float((score(i, j + 7) - base).abs().max())  # a different offset gives a different score
    claim = Claim(
        claim="With RoPE, q'_i · k'_j depends only on i − j",
        notes="q'_i · k'_j 只依赖于相对位置 i - j",
        nanomm=(f"shifting both positions by up to 2047: max |Δscore| / (|q||k|) = {worst[torch.float64]:.1e} (float64), "
                f"{worst[torch.float32]:.1e} (float32); changing the offset moves scores by up to {spread:.1f}"),
        verdict="holds",
        source="Su et al. (RoFormer) 2021, Eq. 16",
    )
    return claim, {"rope_shift_rel_err_f64": worst[torch.float64], "rope_shift_rel_err_f32": worst[torch.float32]}


def _apply_rope_bug(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    B, H, D = 2, 8, 16
    x = torch.randn(B, H, H, D, generator=g)  # (B, S, H, D) with S == H
    freqs = torch.arange(H, dtype=torch.float32)[:, None] * rope_inv_freq(D)  # (S, D/2)
    silent = float((notes_apply_rope(x, freqs) - apply_rope_complex(x, freqs)).abs().max())
    S = 12
    freqs_long = torch.arange(S, dtype=torch.float32)[:, None] * rope_inv_freq(D)
    try:
        notes_apply_rope(torch.randn(B, S, H, D, generator=g), freqs_long)
        loud = "runs"
    except RuntimeError as e:
        loud = f"RuntimeError ({str(e).split(' at ')[0]})"
    claim = Claim(
        claim="apply_rope(x, freqs) with x (batch, seq, heads, head_dim) and freqs (seq, head_dim/2)",
        notes="x_rotated = x_complex * np.exp(1j * freqs)",
        nanomm=(f"freqs broadcasts against the heads axis: S = H = {H} runs silently wrong, max |notes − fixed| = "
                f"{silent:.2f}; S = {S}, H = {H}: {loud}. Fix: freqs[None, :, None, :]"),
        verdict="wrong",
        source="Meta llama model.py reshape_for_broadcast: freqs viewed as (1, S, 1, D/2)",
    )
    return claim, {"notes_apply_rope_max_diff_S_eq_H": silent}


def _pairing(g: torch.Generator) -> tuple[Claim, dict[str, float]]:
    H, D, d, T = 4, 16, 64, 10
    wq, wk = torch.randn(2, H * D, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    pos = torch.arange(T)

    def scores(wq, wk, layout):
        rope = RotaryEmbedding(D, layout=layout)
        q = rope((x @ wq.T).view(1, T, H, D).transpose(1, 2), pos)
        k = rope((x @ wk.T).view(1, T, H, D).transpose(1, 2), pos)
        return q @ k.transpose(-1, -2)  # (1, H, T, T)

    meta = scores(wq, wk, "interleaved")
    hf = scores(permute_qk_weight(wq, H), permute_qk_weight(wk, H), "half")
    naive = scores(wq, wk, "half")  # Meta weights with HF's rotation and no permutation
    agree, mismatch = float((meta - hf).abs().max()), float((meta - naive).abs().max())
    claim = Claim(
        claim="RoPE code pairs coordinates (2i, 2i+1) via reshape(..., -1, 2)",
        notes="x.reshape(*x.shape[:-1], -1, 2)  # 配对",
        nanomm=(f"that is Meta LLaMA's interleaved layout; Hugging Face pairs (i, i + D/2). Same attention scores "
                f"after permuting the q/k rows: max diff {agree:.1e}; without the permutation: {mismatch:.2f}"),
        verdict="holds",
        source="Meta llama apply_rotary_emb; transformers rotate_half and convert_llama_weights_to_hf permute",
    )
    return claim, {"rope_layout_max_diff_after_permute": agree, "rope_layout_max_diff_without_permute": mismatch}


# ----------------------------------------------------------------------------- the chapter

def run(ctx: TourContext) -> Chapter:
    g = torch.Generator().manual_seed(ctx.seed)
    claims, demo = [], {}
    for claim, numbers in (_equivariance(g), _sinusoidal_formula()):
        claims.append(claim)
        demo |= numbers
    claims.append(_learned_limit())
    claim, numbers, acc = _extrapolation(ctx)
    claims.append(claim)
    demo |= numbers
    for claim, numbers in (_alibi(), _rope_relative(g), _apply_rope_bug(g), _pairing(g)):
        claims.append(claim)
        demo |= numbers
    lines = [
        "Attention sees a set: without positions, shuffling the tokens shuffles the outputs the same way.",
        f"The demo trains one attention head per encoding on 'output the token {LAG} places back' at length "
        f"{TRAIN_LEN}, then reads sequences of length {2 * TRAIN_LEN}. Inside the training length learned and "
        "sinusoidal tie, as in Vaswani's Table 3; past it the sinusoidal model falls apart while RoPE, "
        "relative by construction, holds up better; a learned table has no rows there at all.",
        "RoPE has two layouts in the wild: interleaved pairs (Meta, the notes' complex form) and half-split "
        "pairs (Hugging Face). Converting a checkpoint permutes the q/k projection rows "
        "(`nanomm.nn.position.permute_qk_weight`).",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot_accuracy(ctx, acc)])
