"""Chapter 14: Mixed precision — 16-bit arithmetic, fp32 weights, and the ops that must stay fp32.

Which ops stay fp32 is read from nanomm's policy table (nanomm.train.precision.FP32_POLICY) and from
torch's CPU autocast, probed op by op at run time: an op whose 16-bit inputs come out fp32 is on
torch's fp32 list. Why they stay fp32 is measured: each op is computed once with 16-bit accumulators
(a pairwise fp16 tree reduction, what a half-precision kernel without an fp32 accumulator does) and
once the policy's way (fp32 inside, 16-bit result), both against a float64 truth. Last, a tiny causal
transformer (nanomm's MultiHeadAttention, naive backend so its softmax goes through the policy) is
trained in fp32, fp16 (MixedPrecision with dynamic loss scaling) and bf16 on the same batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanomm.nn.attention import MultiHeadAttention
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.tour.chapters.ch05_fp16 import memory_figures
from nanomm.train.precision import FP32_POLICY, MixedPrecision, float_format

ID = 14
TITLE = "Mixed precision"

MICIKEVICIUS = "Micikevicius et al. 2018, Mixed Precision Training, §3.3"
LOSS_TOKENS = 16384  # 8 sequences of 2048 tokens: Σ loss ≈ 1.1e5 > 65504 at ln 512 + ½ nats per token


# ----------------------------------------------------------------------------- what stays fp32

# name -> a call on one tensor; probed under torch.autocast("cpu") with 16-bit and with fp32 inputs
PROBES = {
    "softmax": lambda h: F.softmax(h, -1), "log_softmax": lambda h: F.log_softmax(h, -1),
    "layer_norm": lambda h: F.layer_norm(h, h.shape[-1:]), "rms_norm": lambda h: F.rms_norm(h, h.shape[-1:]),
    "group_norm": lambda h: F.group_norm(h, 2), "cross_entropy": lambda h: F.cross_entropy(h, torch.zeros(4).long()),
    "nll_loss": lambda h: F.nll_loss(h, torch.zeros(4).long()), "mse_loss": lambda h: F.mse_loss(h, h.detach()),
    "binary_cross_entropy_with_logits": lambda h: F.binary_cross_entropy_with_logits(h, h.detach().sigmoid()),
    "kl_div": lambda h: F.kl_div(h, h.detach(), reduction="batchmean", log_target=True),
    "exp": torch.exp, "log": lambda h: h.abs().log(), "sum": torch.sum, "cumsum": lambda h: h.cumsum(-1),
    "pow": lambda h: h.pow(2), "prod": torch.prod, "cdist": lambda h: torch.cdist(h, h),
    "linear": lambda h: F.linear(h, h),
}


def torch_cpu_autocast(dtype: torch.dtype = torch.float16) -> dict[str, list[str]]:
    """torch's CPU autocast lists, observed: ops that upcast 16-bit inputs, ops that downcast fp32 ones."""
    out = {"fp32": [], "lower": [], "as_input": []}
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=dtype):
        for name, call in PROBES.items():
            if call(x.to(dtype)).dtype == torch.float32:
                out["fp32"].append(name)
            elif call(x).dtype == dtype:
                out["lower"].append(name)
            else:
                out["as_input"].append(name)
    return out


# ----------------------------------------------------------------------------- why: 16-bit accumulators

def sum16(x: Tensor) -> Tensor:
    """Sum over the last axis with every partial sum rounded to fp16 (a pairwise tree, as a GPU kernel reduces)."""
    x = x.half()
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], -1)
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _softmax16(x: Tensor, stable: bool) -> Tensor:
    h = x.half()
    e = (h - h.amax(-1, keepdim=True) if stable else h).exp()
    return e / sum16(e)[..., None]


def _layer_norm16(x: Tensor) -> Tensor:
    h = x.half()
    c = h - (sum16(h) / h.shape[-1])[..., None]
    return c / torch.sqrt(sum16(c * c) / h.shape[-1] + 1e-5)[..., None]


def _rel(got: Tensor, truth: Tensor) -> float:
    """Largest error relative to the largest true value; inf if anything overflowed."""
    got = got.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - truth).abs().max() / truth.abs().max()).item()


def accumulator_errors(quick: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    rows, d = (16, 1024) if quick else (64, 1024)
    out: dict[str, float] = {}
    logits = torch.randn(rows, d, generator=g, dtype=torch.float64) * 4  # attention scores of std 4
    truth = torch.softmax(logits, -1)
    naive = _softmax16(logits, stable=False).double()
    out["softmax_fp16_naive_rows_nonfinite"] = (~torch.isfinite(naive)).any(-1).double().mean().item()
    out["softmax_fp16_acc_err"] = _rel(_softmax16(logits, stable=True), truth)
    out["softmax_policy_err"] = _rel(F.softmax(logits.half().float(), -1).half(), truth)
    for rms in (1, 8):  # rms 8 at width 1024: Σx² = 65536 > 65504
        x = torch.randn(rows, d, generator=g, dtype=torch.float64) * rms + 0.5
        truth = F.layer_norm(x.half().double(), (d,))
        out[f"layernorm_rms{rms}_fp16_acc_err"] = _rel(_layer_norm16(x), truth)
        out[f"layernorm_rms{rms}_policy_err"] = _rel(F.layer_norm(x.half().float(), (d,)).half(), truth)
    tokens, vocab = LOSS_TOKENS, 512
    per_token = F.cross_entropy(torch.randn(tokens, vocab, generator=g, dtype=torch.float64),
                                torch.randint(vocab, (tokens,), generator=g), reduction="none")
    for n in (2048, tokens):
        truth = per_token[:n].mean()
        out[f"loss_mean_{n}_tokens_fp16_acc_err"] = _rel(sum16(per_token[:n]) / n, truth)
        out[f"loss_mean_{n}_tokens_policy_err"] = _rel(per_token[:n].float().mean(), truth)
    # the report is JSON: an overflow becomes a flag, "..._overflow" = 1, instead of an infinite error
    return {k.replace("_err", "_overflow") if math.isinf(v) else k: 1.0 if math.isinf(v) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- a tiny training run

class TinyLM(nn.Module):
    """One pre-norm transformer block: embeddings, causal attention, MLP, final norm, head."""

    def __init__(self, vocab: int = 16, dim: int = 32, heads: int = 4, T: int = 16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(T, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, backend="naive")  # its torch.softmax meets the policy
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # (B, T, dim)
        x = x + self.attn(self.ln1(x), causal=True)
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))  # (B, T, vocab)


def _copy_batch(g: torch.Generator, B: int = 32, T: int = 16, vocab: int = 16) -> Tensor:
    """First half random tokens, second half the same again: learnable only by attending back."""
    half = torch.randint(vocab, (B, T // 2), generator=g)
    return torch.cat([half, half], 1)


def train_tiny(precision: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    mp = MixedPrecision(TinyLM(), precision)
    opt = torch.optim.AdamW(mp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = _copy_batch(g)
        with mp.autocast():
            logits = mp.model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        losses.append(loss.item())
        mp.backward(loss)
        mp.step(opt)
    return losses


def _plot(curves: dict[str, list[float]], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(6, 4.6), sharex=True, height_ratios=(2, 1))
    for (name, ys), color in zip(curves.items(), ("black", "tab:orange", "tab:green")):
        ax.plot(ys, label=name, lw=1.2, color=color)
        if name != "fp32":
            dx.semilogy([abs(a - b) + 1e-9 for a, b in zip(ys, curves["fp32"])], label=f"|{name} − fp32|", lw=1,
                        color=color)
    ax.set_ylabel("training loss")
    ax.set_title("tiny causal transformer, copy task: fp32 vs mixed fp16 / bf16")
    ax.legend()
    dx.set_xlabel("step")
    dx.set_ylabel("loss gap")
    dx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: TourContext) -> Chapter:
    policy = {name: rule for name, (_, rule, _) in FP32_POLICY.items()}
    cpu = torch_cpu_autocast()
    err = accumulator_errors(ctx.quick)
    steps = 30 if ctx.quick else 100
    curves = {p: train_tiny(p, steps) for p in ("fp32", "fp16", "bf16")}
    gap16 = max(abs(a - b) for a, b in zip(curves["fp16"], curves["fp32"]))
    gapbf = max(abs(a - b) for a, b in zip(curves["bf16"], curves["fp32"]))
    mem = memory_figures()
    mp = MixedPrecision(nn.Linear(4, 4), "fp16", loss_scale=2.0**8)
    opt = torch.optim.AdamW(mp.parameters())
    mp.backward(mp.model(torch.ones(1, 4, dtype=torch.float16)).float().sum())
    mp.step(opt)
    state_dtypes = sorted({str(t.dtype) for s in opt.state.values() for k, t in s.items() if k != "step"})
    exp_limit = math.log(float_format("fp16").max)
    tokens = LOSS_TOKENS
    kept = ", ".join(policy)

    claims = [
        Claim("forward/backward in FP16, weights stored and updated in FP32",
              "Forward/Backward：用 FP16；权重存储和更新：用 FP32",
              f"MixedPrecision('fp16'): working weights {next(mp.model.parameters()).dtype}, masters "
              f"{mp.parameters()[0].dtype}, AdamW state {', '.join(state_dtypes)}",
              "holds", f"{MICIKEVICIUS.replace('§3.3', '§3.1')}"),
        Claim("softmax must stay FP32 (exp overflows)", "Softmax（指数运算容易溢出）",
              f"in nanomm's fp32 list ({policy['softmax']} dtype out); e^x overflows fp16 past x = ln 65504 = "
              f"{exp_limit:.2f}: a softmax of N(0, 4²) scores over 1024 keys without max-subtraction is non-finite "
              f"in {err['softmax_fp16_naive_rows_nonfinite']:.0%} of rows in fp16; max-subtraction fixes most of "
              f"it (fp16 sum: error {err['softmax_fp16_acc_err']:.1e}; fp32 inside: {err['softmax_policy_err']:.1e}, "
              "the rounding of the fp16 output)",
              "holds" if "softmax" in policy and err["softmax_fp16_naive_rows_nonfinite"] > 0 else "wrong",
              f"{MICIKEVICIUS}; torch autocast CUDA fp32 list (softmax, log_softmax)"),
        Claim("LayerNorm must stay FP32 (precision-sensitive)", "LayerNorm（归一化对精度敏感）",
              f"in nanomm's fp32 list; width 1024, fp16 sums: error {err['layernorm_rms1_fp16_acc_err']:.1e} at rms 1 "
              f"(fp32 inside: {err['layernorm_rms1_policy_err']:.1e}); at rms 8 Σx² = 65536 overflows and the "
              f"output collapses, error {err['layernorm_rms8_fp16_acc_err']:.2g} (fp32 inside: "
              f"{err['layernorm_rms8_policy_err']:.1e})",
              "holds" if "layer_norm" in policy and err["layernorm_rms8_fp16_acc_err"] > 0.1 else "wrong",
              f"{MICIKEVICIUS}; torch autocast CUDA fp32 list (layer_norm, group_norm)"),
        Claim("the loss must stay FP32", "Loss 计算",
              f"nanomm's losses return fp32 ({', '.join(n for n, r in policy.items() if r == 'fp32')}); torch's "
              f"CPU autocast also upcasts {', '.join(n for n in cpu['fp32'] if n in policy)}; "
              f"the mean of {tokens:,} token losses with an fp16 accumulator: "
              f"{'inf, the sum passes 65504' if f'loss_mean_{tokens}_tokens_fp16_acc_overflow' in err else 'finite'} "
              f"(of 2,048: error "
              f"{err['loss_mean_2048_tokens_fp16_acc_err']:.1e}; fp32: "
              f"{err[f'loss_mean_{tokens}_tokens_policy_err']:.1e})",
              "holds" if policy["cross_entropy"] == "fp32" and f"loss_mean_{tokens}_tokens_fp16_acc_overflow" in err
              else "wrong",
              f"{MICIKEVICIUS}; torch autocast fp32 lists (CPU and CUDA)"),
        Claim("memory −50%", "显存减少 ~50%",
              f"activations ×{mem['activation_ratio']:.2f} (the fp32 islands keep some fp32); model states "
              f"{mem['model_states_B_per_param_fp16']:.0f} B/param mixed vs "
              f"{mem['model_states_B_per_param_fp32']:.0f} fp32",
              "approx", "ZeRO §3.1; audit §5/14"),
        Claim("2–3× faster (Tensor Cores)", "速度提升 2-3x（Tensor Core）",
              f"a GPU figure; this machine: torch.cuda.is_available() = {torch.cuda.is_available()}",
              "unverifiable", "NVIDIA Tensor Core throughput; not measurable on CPU"),
        Claim("almost no loss of accuracy", "精度几乎无损",
              f"tiny transformer, {steps} steps on the same batches: final loss fp32 {curves['fp32'][-1]:.4f}, "
              f"fp16 {curves['fp16'][-1]:.4f}, bf16 {curves['bf16'][-1]:.4f}; largest gap over the run "
              f"{gap16:.3f} (fp16), {gapbf:.3f} (bf16)",
              "holds" if abs(curves["fp16"][-1] - curves["fp32"][-1]) < 0.1 * curves["fp32"][0] else "wrong",
              MICIKEVICIUS.replace("§3.3", "§4 (matches fp32 on every benchmark)")),
    ]
    lines = [
        f"nanomm's fp32 policy (`FP32_POLICY`, applied by `MixedPrecision.autocast()`): {kept}. Norms and "
        "softmax compute in fp32 and hand back 16-bit; losses return fp32.",
        f"torch's CPU autocast, probed here: fp32 for {', '.join(cpu['fp32'])}; 16-bit for "
        f"{', '.join(cpu['lower'])}; input dtype for {', '.join(cpu['as_input'])}. Its CUDA list (torch.amp "
        "docs) adds softmax, log_softmax, layer_norm, group_norm, exp, log, pow, sum, cumsum, norm; on CPU "
        "the kernels for half inputs accumulate in fp32 internally instead.",
        "The demo's fp16-accumulator versions round every partial sum to fp16, like a reduction with a "
        "16-bit accumulator; the policy's versions are what nanomm runs.",
    ]
    path = ctx.plot_path("ch14_fp16_vs_fp32_loss")
    _plot(curves, path)
    demo = {**err, **{f"final_loss_{p}": c[-1] for p, c in curves.items()},
            "max_loss_gap_fp16": gap16, "max_loss_gap_bf16": gapbf}
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[path])
