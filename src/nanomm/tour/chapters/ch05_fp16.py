"""Chapter 5: FP16 training — the format's range, gradient underflow, loss scaling, master weights.

The range figures are derived from fp16's bit layout by nanomm.train.precision.float_format and checked
against torch.finfo. The underflow demo backpropagates a loss whose gradients sit near 1e-8 (the tail
of Micikevicius et al.'s Fig. 3) through an fp16 copy of a small MLP and counts the gradient entries
that come out exactly zero, with and without loss scaling. The loss-scale trace is a short fp16 run
with nanomm's DynamicLossScaler, overflows both natural (a too-high start) and injected, replayed
through torch.amp.GradScaler on the same overflow sequence. Memory is counted from the tensors that
exist after a real AdamW step, in fp32 and in mixed fp16.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.loss_scale import DynamicLossScaler
from nanomm.train.precision import MixedPrecision, float_format, underflow_fraction

ID = 5
TITLE = "FP16 training"

TINY = 2.0**-17  # loss weight that puts the gradients near 1e-8 (median 1.05e-8)
MICIKEVICIUS = "Micikevicius et al. 2018, Mixed Precision Training"


def _data(n: int = 256, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x @ torch.randn(d, 4, generator=g)).argmax(1)


def _mlp(d: int = 32, h: int = 64, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 4))


def _loss(mp: MixedPrecision, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with mp.autocast():
        return F.cross_entropy(mp.model(x.to(mp.dtype)), y)


def underflow(loss_scales: dict[str, float]) -> tuple[dict[str, float], float]:
    """Fraction of gradient entries flushed to 0 in fp16 for each static scale, and the median |g| in fp32."""
    x, y = _data()
    ref = _mlp()
    (F.cross_entropy(ref(x), y) * TINY).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    out = {}
    for label, s in loss_scales.items():
        mp = MixedPrecision(_mlp(), "fp16", loss_scale=s)
        mp.backward(_loss(mp, x, y) * TINY)
        mp.unscale_()
        out[label] = underflow_fraction([m.grad for m in mp.parameters()], ref_grads)
    return out, torch.cat([g.abs().flatten() for g in ref_grads]).median().item()


def grad_scaler_trace(found_inf: list[bool], scaler: DynamicLossScaler) -> list[float]:
    """torch.amp.GradScaler's scale after each step, fed the same overflows (an inf put into the gradient)."""
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    sc = torch.amp.GradScaler("cpu", init_scale=scaler.scale, growth_factor=scaler.growth_factor,
                              backoff_factor=scaler.backoff_factor, growth_interval=scaler.growth_interval)
    out = []
    for bad in found_inf:
        opt.zero_grad()
        sc.scale(p.sum()).backward()
        if bad:
            p.grad[0] = float("inf")
        sc.step(opt)
        sc.update()
        out.append(sc.get_scale())
    return out


def scale_trace(steps: int, inject: set[int], growth_interval: int = 6) -> dict[str, list]:
    """An fp16 run starting at S = 2^24 (too high: natural overflows), with inf injected at `inject`."""
    x, y = _data(n=128)
    scaler = DynamicLossScaler(2.0**24, growth_interval=growth_interval)
    start = DynamicLossScaler(2.0**24, growth_interval=growth_interval)
    mp = MixedPrecision(_mlp(), "fp16", loss_scale=scaler)
    opt = torch.optim.AdamW(mp.parameters(), lr=3e-3)
    tried, taken, losses = [], [], []
    for step in range(steps):
        tried.append(mp.scale)
        loss = _loss(mp, x, y)
        losses.append(loss.item())
        mp.backward(loss)
        if step in inject:
            next(mp.model.parameters()).grad[0, 0] = float("inf")
        taken.append(mp.step(opt))
    after = tried[1:] + [mp.scale]
    return {"tried": tried, "after": after, "taken": taken, "losses": losses,
            "torch": grad_scaler_trace([not t for t in taken], start)}


def _saved_bytes(model: nn.Module, run) -> int:
    """Bytes autograd saves for backward during `run()`, parameters excluded (they are model states)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def memory_figures() -> dict[str, float]:
    """Bytes per parameter of the model states after an AdamW step, and activation bytes, fp32 vs fp16."""
    x, y = _data(n=128, d=32)
    out = {}
    for prec in ("fp32", "fp16"):
        mp = MixedPrecision(_mlp(h=128), prec)
        opt = torch.optim.AdamW(mp.parameters(), lr=1e-3)
        mp.backward(_loss(mp, x, y))
        mp.step(opt)
        act = _saved_bytes(mp.model, lambda: mp.backward(_loss(mp, x, y)))  # grads now in the working copy
        n = sum(p.numel() for p in mp.parameters())
        tensors = list(mp.model.parameters()) + [p.grad for p in mp.model.parameters() if p.grad is not None]
        tensors += mp.parameters() if mp.separate else []
        tensors += [t for s in opt.state.values() for k, t in s.items() if k != "step"]  # step: one scalar each
        out[f"model_states_B_per_param_{prec}"] = sum(t.numel() * t.element_size() for t in tensors) / n
        out[f"activation_bytes_{prec}"] = float(act)
    out["activation_ratio"] = out["activation_bytes_fp16"] / out["activation_bytes_fp32"]
    return out


def _master_weights(updates: int = 100, lr_step: float = 1e-4) -> tuple[float, float]:
    """w = 1 plus `updates` steps of 1e-4: applied to an fp16 weight each one is below half an ulp (2⁻¹¹)."""
    w16, w32 = torch.ones((), dtype=torch.float16), torch.ones(())
    for _ in range(updates):
        w16, w32 = w16 + lr_step, w32 + lr_step
    return w16.item(), w32.item()


def _cuda_amp_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from torch.cuda.amp import GradScaler, autocast  # the notes' import
        GradScaler(), autocast()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def _plot(trace: dict[str, list], inject: set[int], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(trace["tried"]))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.step(steps, [math.log2(s) for s in trace["tried"]], where="post", label="nanomm DynamicLossScaler")
    ax.step(steps, [math.log2(s) for s in [trace["tried"][0]] + trace["torch"][:-1]], "k--", where="post", lw=1,
            label="torch.amp.GradScaler, same overflows")
    for s in steps:
        if not trace["taken"][s]:
            ax.plot(s, math.log2(trace["tried"][s]), "x", color="tab:red" if s in inject else "tab:orange")
    ax.plot([], [], "x", color="tab:orange", label="natural overflow (skipped)")
    ax.plot([], [], "x", color="tab:red", label="injected inf (skipped)")
    ax.set_xlabel("step")
    ax.set_ylabel("log2 loss scale")
    ax.set_title("fp16 dynamic loss scaling: ×0.5 and skip on overflow, ×2 after a clean run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: TourContext) -> Chapter:
    f16, f32 = float_format("fp16"), float_format("fp32")
    fi = torch.finfo(torch.float16)
    fractions, median_g = underflow({"S=1": 1.0, "S=1024": 1024.0, "S=2^16": 2.0**16})
    steps = 30 if ctx.quick else 90
    inject = {18, 19} if ctx.quick else {40, 41, 70}
    trace = scale_trace(steps, inject)
    natural = sum(not t for s, t in enumerate(trace["taken"]) if s not in inject)
    torch_equal = trace["after"] == trace["torch"]
    ours = DynamicLossScaler()
    theirs = torch.amp.GradScaler("cpu")
    defaults_ours = (ours.scale, ours.growth_factor, ours.growth_interval, ours.backoff_factor)
    defaults_torch = (theirs.get_scale(), theirs.get_growth_factor(), theirs.get_growth_interval(),
                      theirs.get_backoff_factor())
    mem = memory_figures()
    w16, w32 = _master_weights()
    deprecations = _cuda_amp_warnings()

    claims = [
        Claim("FP16's largest value is 65504", "最大 65504",
              f"{f16.max:g} = (2 − 2⁻¹⁰)·2¹⁵ from the bit layout; torch.finfo: {fi.max:g}",
              "holds" if f16.max == fi.max == 65504 else "wrong", "IEEE 754-2008 binary16; torch.finfo"),
        Claim("FP16's smallest value is 6e-8", "最小 6e-8",
              f"smallest subnormal 2⁻²⁴ = {f16.min_subnormal:.3g}; "
              f"smallest normal 2⁻¹⁴ = {f16.min_normal:.3g} "
              f"(torch.finfo.smallest_normal {fi.smallest_normal:.3g}); below 2⁻¹⁴ precision drops bit by bit",
              "approx", "IEEE 754-2008 binary16 (audit §5: correct with caveat)"),
        Claim("FP16 has a 10-bit mantissa, FP32 23", "尾数只有 10 位（FP32 是 23 位）",
              f"{f16.mantissa_bits} and {f32.mantissa_bits} stored bits (+1 implicit); eps 2⁻¹⁰ = {f16.eps:.3g} "
              f"(torch.finfo {fi.eps:.3g})",
              "holds" if (f16.mantissa_bits, f32.mantissa_bits, f16.eps) == (10, 23, fi.eps) else "wrong",
              "IEEE 754-2008"),
        Claim("gradients easily underflow to 0 in FP16", "梯度容易下溢（太小变成 0）",
              f"gradients with median |g| = {median_g:.2g}: {fractions['S=1']:.1%} of entries become exactly 0 "
              f"in fp16 without scaling, {fractions['S=1024']:.2%} with S = 1024, "
              f"{fractions['S=2^16']:.2%} with S = 2¹⁶",
              "holds" if fractions["S=1"] > 0.5 > fractions["S=2^16"] else "wrong", f"{MICIKEVICIUS}, §3.2, Fig. 3"),
        Claim("FP32 master weights: store and update in FP32", "权重用 FP32 存储和更新",
              f"w = 1 plus 100 updates of 1e-4: {w16:g} in fp16 (each is under half an ulp, 2⁻¹¹), "
              f"{w32:.6g} in fp32", "holds" if w16 == 1.0 and abs(w32 - 1.01) < 1e-5 else "wrong",
              f"{MICIKEVICIUS}, §3.1"),
        Claim("dynamic loss scaling: grow while clean, shrink and skip on inf/NaN",
              "如果出现 inf/nan，减小 scale，跳过这步更新",
              f"nanomm defaults (init, ×growth, after, ×backoff) = {defaults_ours}; torch.amp.GradScaler: "
              f"{defaults_torch}; trace of {steps} fp16 steps with {natural} natural and {len(inject)} injected "
              f"overflows equals GradScaler's: {torch_equal}",
              "holds" if defaults_ours == defaults_torch and torch_equal else "wrong",
              "torch.amp.GradScaler; DeepSpeed fp16 config (loss_scale_window 1000, hysteresis 2)"),
        Claim("`from torch.cuda.amp import autocast, GradScaler`", "from torch.cuda.amp import autocast, GradScaler",
              "FutureWarning: " + (" / ".join(deprecations) if deprecations else "none raised"),
              "approx" if deprecations else "holds", "torch.amp: autocast('cuda'), GradScaler('cuda')"),
        Claim("FP16 halves memory", "显存减半",
              f"activations ×{mem['activation_ratio']:.2f}; Adam model states "
              f"{mem['model_states_B_per_param_fp32']:.1f} B/param in fp32 and "
              f"{mem['model_states_B_per_param_fp16']:.1f} B/param in mixed fp16 (2 + 2 + 4 + 4 + 4)",
              "approx", "ZeRO §3.1 (16 B/param = 2Ψ + 2Ψ + 12Ψ); audit §5/14"),
    ]
    demo = {**{f"zeroed_grad_fraction_{k}": v for k, v in fractions.items()},
            "trace_steps": steps, "trace_skipped": sum(not t for t in trace["taken"]),
            "trace_natural_overflows": natural, "trace_final_scale": trace["after"][-1],
            "trace_equals_grad_scaler": float(torch_equal), "trace_final_loss": trace["losses"][-1],
            "activation_ratio_fp16_vs_fp32": mem["activation_ratio"],
            "model_states_B_per_param_fp32": mem["model_states_B_per_param_fp32"],
            "model_states_B_per_param_fp16": mem["model_states_B_per_param_fp16"]}
    lines = [
        "Loss scaling moves the gradient histogram up by log2 S binades; nanomm divides by S in fp32 "
        "(dividing in fp16 would underflow again) into the fp32 masters, then skips the step if any "
        "entry is inf/NaN.",
        "DeepSpeed `fp16` keys map to nanomm's `DynamicLossScaler` (`from_deepspeed`): `loss_scale` 0 → "
        "dynamic, > 0 → static; `initial_scale_power` p → init 2^p; `loss_scale_window` → growth_interval; "
        "`hysteresis`, `consecutive_hysteresis`, `min_loss_scale` → the same options. DeepSpeed 0.19 "
        "grows one clean step later than torch.",
        "The notes' snippet runs with `torch.amp.autocast('cuda')` and `torch.amp.GradScaler('cuda')` "
        "today; clip gradients only after `scaler.unscale_(optimizer)`.",
    ]
    path = ctx.plot_path("ch05_loss_scale_trace")
    _plot(trace, inject, path)
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[path])
