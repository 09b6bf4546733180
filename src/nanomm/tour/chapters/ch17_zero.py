"""Chapter 17: DeepSpeed and ZeRO — who holds which bytes, predicted by the memory model and measured.

The figures come from nanomm.train.memory (ZeRO §3–5 accounting) and nanomm.models.count_params; the
notes' DeepSpeed config is put through nanomm's own check of DeepSpeed's batch identity, and the
launcher wording through DeepSpeed's own argument parser. Then a real run: two processes on this
machine (gloo) train a tiny LLaMA with ZeRO-1 (quick) or ZeRO-1, ZeRO-3 and DeepSpeed ZeRO-2, and each
rank's optimizer bytes are measured beside the model's prediction; last, activation checkpointing's
saving is measured on the block stack and compared with its formula.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile

import torch

from nanomm.models import build, count_params, preset
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.memory import GB, activations, limit_reduction, model_states, reduction
from nanomm.train.objectives import causal_lm
from nanomm.train.trainer import TrainConfig

ID = 17
TITLE = "DeepSpeed and ZeRO"

ZERO = "Rajbhandari et al. 2020, ZeRO, §5.1 and Fig. 1"
PAPER_7_5B = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # GB per device at N_d = 64 (ZeRO Fig. 1)
NOTES_CONFIG = {"train_batch_size": 32, "gradient_accumulation_steps": 4, "fp16": {"enabled": True},
                "zero_optimization": {"stage": 2}}
# ZeRO §7: data parallel all-reduces gradients (reduce-scatter + all-gather = 2Ψ per step); ZeRO-1/2 do the
# same 2Ψ as a reduce-scatter of g and an all-gather of the updated weights; ZeRO-3 all-gathers the weights
# again in backward: 3Ψ
COMM_PSI = {0: 2, 1: 2, 2: 2, 3: 3}


# ----------------------------------------------------------------------------- the job of the live run

VOCAB, SEQ, ROWS = 128, 16, 4


class _Tokens:
    """Seeded random token blocks: the global batch of the live run."""

    def __init__(self) -> None:
        self.index = 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.index)
        self.index += 1
        ids = torch.randint(VOCAB, (ROWS, SEQ + 1), generator=g)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def tour_job():
    """A 4-block LLaMA (GQA, SwiGLU, RoPE) of ~0.1M parameters, 2 steps of next-token prediction."""
    from nanomm.train.distributed import Job

    model = build(preset("llama-tiny", vocab_size=VOCAB, max_positions=SEQ, n_layer=4, n_head=4, n_kv_head=2,
                         dim=64, ff_dim=128))
    cfg = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, log_every=1)
    return Job(model, causal_lm, _Tokens(), cfg)


def live_runs(quick: bool) -> dict[str, float]:
    """Train the tour job on 2 processes per mode; per-rank optimizer bytes against the memory model."""
    from nanomm.train.distributed import launch

    runs = {"zero1": ("zero1", None, 1, "fp32")}
    if not quick:
        runs |= {"zero3": ("zero3", None, 3, "fp32"),
                 "deepspeed_zero2": ("deepspeed", {"zero_optimization": {"stage": 2}}, 2, "mixed")}
    out: dict[str, float] = {}
    for name, (mode, ds, stage, accounting) in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = launch(tour_job, tmp, distributed=mode, nproc=2, ds_config=ds, start_method="fork",
                            timeout_s=300)
        n = result.n_params
        # DeepSpeed keeps an fp32 master partition even for an fp32 model: the "mixed" K = 12
        predicted = model_states(n, stage=stage, n_devices=2, precision=accounting).items["optimizer"]
        unsharded = model_states(n, stage=0, precision=accounting).items["optimizer"]
        for rank, held in enumerate(result.state_bytes):
            out[f"{name}_rank{rank}_optimizer_bytes"] = held["optimizer"]
            out[f"{name}_rank{rank}_vs_prediction"] = held["optimizer"] / predicted
            out[f"{name}_rank{rank}_vs_unsharded"] = held["optimizer"] / unsharded
        out[f"{name}_predicted_optimizer_bytes"] = predicted
        out["live_n_params"] = n
    return out


# ----------------------------------------------------------------------------- the claims

def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def _sixteen_bytes() -> Claim:
    both = {p: model_states(10**10, precision=p) for p in ("fp32", "mixed")}
    ok = all(e.total == 160e9 for e in both.values())
    fp32, mixed = (both[p].items for p in ("fp32", "mixed"))
    return Claim("10B parameters × 16 bytes = 160 GB of model states, more than one GPU holds",
                 "模型参数 4 + 梯度 4 + Adam 8 bytes; 10B × 16 bytes = 160GB",
                 f"{_gb(both['fp32'].total)} with fp32 Adam ({fp32['weights'] / 1e10:.0f} + {fp32['gradients'] / 1e10:.0f}"
                 f" + {fp32['optimizer'] / 1e10:.0f} B/param); {_gb(both['mixed'].total)} with mixed precision "
                 f"({mixed['weights'] / 1e10:.0f} + {mixed['gradients'] / 1e10:.0f} + {mixed['optimizer'] / 1e10:.0f}: "
                 "fp16 weights and grads, fp32 master + m + v)",
                 "holds" if ok else "wrong", "ZeRO §3.1 (mixed-precision Adam: 2Ψ + 2Ψ + 12Ψ)")


def _stage_claim(stage: int, notes: str, factor: float) -> Claim:
    at8, at64, limit = reduction(stage, 8), reduction(stage, 64), limit_reduction(stage)
    own = limit_reduction(stage, "fp32")
    verdict = "holds" if abs(at8 - factor) < 0.05 * factor else "approx" if limit == factor else "wrong"
    return Claim(f"ZeRO-{stage} cuts per-device memory {factor:g}×", notes,
                 f"{at8:.2f}× at N_d=8, {at64:.2f}× at N_d=64; {limit:g}× only as N_d → ∞ "
                 f"(with the notes' own 4+4+8 bytes the limit would be {own:g}×)", verdict, ZERO)


def _zero3(n_devices: int = 8) -> Claim:
    r = reduction(3, n_devices)
    comm = COMM_PSI[3] / COMM_PSI[0]
    return Claim("ZeRO-3 divides memory by N, at the price of more communication",
                 "显存减少 N 倍; 代价：通信量增加",
                 f"{r:.2f}× at N_d={n_devices} (16Ψ/N_d); {comm:.1f}× data parallel's communication "
                 f"({COMM_PSI[3]}Ψ vs {COMM_PSI[0]}Ψ per step)",
                 "holds" if abs(r - n_devices) < 1e-9 else "wrong", "ZeRO §5.3 and §7.2")


def _seven_b() -> tuple[Claim, float]:
    n = count_params(preset("llama-7b")).total
    total = model_states(n).total
    verdict = "holds" if abs(total / 112e9 - 1) < 0.01 else "approx" if abs(total / 112e9 - 1) < 0.1 else "wrong"
    return Claim("full fine-tuning a 7B model needs 112 GB (16 B/param, before activations)",
                 "7B 全参微调 ≈ 112GB", f"{_gb(total)} for LLaMA-7B's exact {n:,} parameters × 16 B "
                 f"(112 GB is 7.0B × 16)", verdict, "LLaMA Table 2; ZeRO §3.1"), total


def _ds_config() -> tuple[Claim, dict[str, float]]:
    from nanomm.train.deepspeed_engine import check_ds_config

    cpu_config = {**NOTES_CONFIG, "fp16": {"enabled": False}}  # fp16 is a GPU feature on this machine
    fits = {}
    for world in (1, 2, 3, 4, 8):
        try:
            fits[world] = check_ds_config(cpu_config, world_size=world)["gradient_accumulation_steps"]
        except ValueError:
            fits[world] = 0
    valid = [w for w, ok in fits.items() if ok]
    micro = {w: NOTES_CONFIG["train_batch_size"] // (NOTES_CONFIG["gradient_accumulation_steps"] * w) for w in valid}
    # DeepSpeed's own parser: --deepspeed is a switch, the file goes after --deepspeed_config
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import deepspeed

    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    notes_args, rest = parser.parse_known_args(["--deepspeed", "ds_config.json"])
    right = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds_config.json"])
    ok = right.deepspeed_config == "ds_config.json" and notes_args.deepspeed_config is None and rest
    claim = Claim("launch with `deepspeed train.py --deepspeed ds_config.json`; config "
                  "train_batch_size 32, gradient_accumulation_steps 4, fp16, ZeRO stage 2",
                  "deepspeed train.py --deepspeed ds_config.json",
                  f"DeepSpeed's parser reads --deepspeed as a switch and leaves {rest} unparsed: the file goes after "
                  f"--deepspeed_config. The config is consistent (train_batch_size = micro × accumulation × world) on "
                  f"{valid} processes only, micro-batch {micro}; fp16 needs a GPU here",
                  "approx" if ok else "wrong", "deepspeed.add_config_arguments; DeepSpeed config docs")
    return claim, {f"notes_config_micro_batch_on_{w}": float(m) for w, m in micro.items()}


def _checkpointing(quick: bool) -> tuple[Claim, dict[str, float]]:
    from nanomm.train.memory_report import checkpoint_blocks, stored_activations

    B, T = 2, 32 if quick else 128
    cfg = preset("llama-tiny", vocab_size=64, max_positions=T, n_layer=4, n_head=4, n_kv_head=2, dim=64, ff_dim=128)
    stored = {}
    for name, wrap in (("plain", lambda m: m), ("checkpoint", checkpoint_blocks)):
        torch.manual_seed(0)
        model = wrap(build(cfg).to(torch.bfloat16))
        x = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
        extra = model.positions.attention_kwargs(torch.arange(T))

        def forward(model=model, x=x, extra=extra):
            h = x.clone()  # the first block's input, made inside the measured pass like the others
            for block in model.blocks:
                h = block(h, causal=True, **extra)
            return h

        stored[name] = stored_activations(forward)
    predicted = activations(cfg.n_layer, cfg.dim, cfg.n_head, seq_len=T, micro_batch=B, mode="checkpoint")
    ratio = stored["plain"].stored / stored["checkpoint"].stored
    claim = Claim("activation checkpointing saves (activation) memory", "Activation Checkpointing：省显存",
                  f"{cfg.n_layer} LLaMA blocks, bf16, s={T}, b={B}: {stored['plain'].stored:,} → "
                  f"{stored['checkpoint'].stored:,} bytes kept for backward ({ratio:.1f}× less; the formula's "
                  f"2·s·b·h per block = {predicted:,.0f}); peak {stored['plain'].peak:,} → {stored['checkpoint'].peak:,}",
                  "holds" if stored["checkpoint"].stored < stored["plain"].stored else "wrong", "Chen et al. 2016")
    return claim, {"activations_plain_bytes": stored["plain"].stored,
                   "activations_checkpoint_bytes": stored["checkpoint"].stored,
                   "activations_checkpoint_predicted_bytes": predicted, "activation_saving": ratio}


def _plot(ctx: TourContext) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names, bottom = ["DP", "ZeRO-1", "ZeRO-2", "ZeRO-3"], [0.0] * 4
    for item, colour in (("weights", "#4c72b0"), ("gradients", "#dd8452"), ("optimizer", "#55a868")):
        values = [model_states(int(7.5e9), stage=s, n_devices=64).items[item] / GB for s in range(4)]
        ax.bar(names, values, bottom=bottom, label=item, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.text(i, total + 2, f"{total:.1f}", ha="center")
    ax.set_ylabel("GB per device")
    ax.set_title("7.5B parameters, N_d = 64, mixed-precision Adam (ZeRO Fig. 1)")
    ax.legend()
    fig.tight_layout()
    path = ctx.plot_path("ch17_zero_7_5b")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    claims = [_sixteen_bytes(),
              _stage_claim(1, "ZeRO-1：分片优化器状态, 显存减少 4x（假设 Adam 占主要）", 4),
              _stage_claim(2, "ZeRO-2：分片优化器状态 + 梯度, 显存减少 8x", 8),
              _zero3()]
    seven, seven_total = _seven_b()
    ds_claim, demo = _ds_config()
    ckpt_claim, ckpt_demo = _checkpointing(ctx.quick)
    claims += [seven, ds_claim, ckpt_claim]
    paper = {s: model_states(int(7.5e9), stage=s, n_devices=64).total / GB for s in range(4)}
    demo |= {f"paper_7_5b_stage{s}_gb": v for s, v in paper.items()} | {"llama_7b_full_finetune_gb": seven_total / GB}
    demo |= ckpt_demo
    demo |= live_runs(ctx.quick)
    live = sorted({k.split("_rank")[0] for k in demo if "_rank" in k})
    lines = [
        "| N_d = 64, 7.5B | DP | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---|---|---|---|",
        "| nanomm (GB) | " + " | ".join(f"{paper[s]:.1f}" for s in range(4)) + " |",
        "| ZeRO paper (GB) | " + " | ".join(f"{PAPER_7_5B[s]:.1f}" for s in range(4)) + " |",
        "The notes' 4× and 8× are what ZeRO-1 and ZeRO-2 tend to as the number of devices grows; with 8 GPUs "
        "they give 2.9× and 4.3×. Only ZeRO-3 divides by N, because only it shards the weights too.",
        "Live, 2 processes (gloo): " + "; ".join(
            f"{name}: rank optimizer bytes {demo[f'{name}_rank0_optimizer_bytes']:,.0f} / "
            f"{demo[f'{name}_rank1_optimizer_bytes']:,.0f}, predicted {demo[f'{name}_predicted_optimizer_bytes']:,.0f} "
            f"(×{demo[f'{name}_rank0_vs_prediction']:.3f})" for name in live) + ".",
        "DeepSpeed keeps an fp32 master partition beside m and v even for an fp32 model, so its optimizer holds "
        "12 B/param (mixed precision's K), not fp32 Adam's 8.",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx)])
