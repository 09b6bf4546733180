"""How many bytes each device holds when training: the ZeRO memory model, itemised.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (SC'20), §3–5.
Mixed-precision Adam keeps, per parameter: a 16-bit weight (2 B), a 16-bit gradient (2 B) and K = 12 B of
optimizer state (fp32 master copy, momentum m and variance v). With Ψ parameters and N_d data-parallel
devices, the bytes per device are

    plain data parallel   (2 + 2 + K)·Ψ
    ZeRO-1 (P_os)         2Ψ + 2Ψ + K·Ψ/N_d
    ZeRO-2 (P_os+g)       2Ψ + (2 + K)·Ψ/N_d
    ZeRO-3 (P_os+g+p)     (2 + 2 + K)·Ψ/N_d

so the savings are 4× and 8× only in the limit N_d → ∞ (16/4 and 16/2) and N_d-fold for ZeRO-3.
Activations come on top: per transformer layer, in 16-bit, s·b·h·(34 + 5·a·s/h) bytes (Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Eq. 2); FlashAttention removes
the 5·a·s²·b term, and checkpointing each block keeps only its 2·s·b·h-byte input.

Units: GB = 10⁹ bytes, as in the ZeRO paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9

# precision -> (bytes per weight, bytes per gradient, K = optimizer bytes per trainable parameter)
PRECISIONS: dict[str, tuple[int, int, int]] = {
    "mixed": (2, 2, 12),  # fp16/bf16 weights and grads, fp32 master + Adam m, v (ZeRO §3.1)
    "fp32": (4, 4, 8),  # everything fp32: weights, grads, Adam m, v (the notes' 4 + 4 + 8 accounting)
}

# stage -> which of (optimizer states, gradients, parameters) are partitioned over the N_d devices
STAGES: dict[int, tuple[bool, bool, bool]] = {
    0: (False, False, False),
    1: (True, False, False),
    2: (True, True, False),
    3: (True, True, True),
}


@dataclass
class MemoryEstimate:
    """Bytes per device, item by item."""

    items: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())

    def gb(self) -> dict[str, float]:
        return {k: v / GB for k, v in {**self.items, "total": self.total}.items()}


def _check(stage: int, n_devices: int, precision: str, n_params: int, trainable: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {sorted(STAGES)} (0 = plain data parallel), got {stage!r}")
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices: expected an integer >= 1, got {n_devices!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    if n_params < 1:
        raise ValueError(f"n_params: expected >= 1, got {n_params}")
    if not 0 <= trainable <= n_params:
        raise ValueError(f"trainable: expected between 0 and n_params={n_params}, got {trainable}")


def model_states(n_params: int, *, stage: int = 0, n_devices: int = 1, precision: str = "mixed",
                 trainable: int | None = None) -> MemoryEstimate:
    """Bytes per device for weights, gradients and optimizer states under ZeRO ``stage`` (0 = plain DP).

    ``trainable`` < ``n_params`` models a frozen base with a few trainable parameters (LoRA, adapters):
    frozen weights need no gradient and no optimizer state.
    """
    trainable = n_params if trainable is None else trainable
    _check(stage, n_devices, precision, n_params, trainable)
    b_w, b_g, k = PRECISIONS[precision]
    os_sharded, g_sharded, p_sharded = STAGES[stage]

    def per_device(total_bytes: float, sharded: bool) -> float:
        return total_bytes / n_devices if sharded else total_bytes

    return MemoryEstimate({
        "weights": per_device(b_w * n_params, p_sharded),
        "gradients": per_device(b_g * trainable, g_sharded),
        "optimizer": per_device(k * trainable, os_sharded),
    })


def reduction(stage: int, n_devices: int, precision: str = "mixed") -> float:
    """How many times less model-state memory ZeRO ``stage`` needs than plain data parallel."""
    base = model_states(1_000_000, stage=0, n_devices=n_devices, precision=precision).total
    return base / model_states(1_000_000, stage=stage, n_devices=n_devices, precision=precision).total


def limit_reduction(stage: int, precision: str = "mixed") -> float:
    """The N_d → ∞ limit of ``reduction``: what "ZeRO-1 saves 4×, ZeRO-2 8×" really refers to."""
    b_w, b_g, k = PRECISIONS[precision]
    os_sharded, g_sharded, p_sharded = STAGES[stage]
    kept = (0 if p_sharded else b_w) + (0 if g_sharded else b_g) + (0 if os_sharded else k)
    return float("inf") if kept == 0 else (b_w + b_g + k) / kept


# activation bytes per layer per token-row, by how attention and recomputation are done
# (s = sequence, b = micro-batch, h = hidden, a = heads; 16-bit activations; Korthikanti et al. Eq. 2)
ACTIVATIONS = {
    "naive": lambda s, b, h, a: s * b * h * (34 + 5 * a * s / h),  # stores the (a, s, s) scores and softmax
    "flash": lambda s, b, h, a: 34 * s * b * h,  # FlashAttention recomputes the scores in backward
    "checkpoint": lambda s, b, h, a: 2 * s * b * h,  # only each block's input is kept; the rest recomputed
}


def activations(n_layers: int, hidden: int, n_heads: int, *, seq_len: int, micro_batch: int,
                mode: str = "flash") -> float:
    """Estimated activation bytes per device for a transformer stack (excluding embeddings and logits)."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"mode: expected one of {sorted(ACTIVATIONS)}, got {mode!r}")
    for name, value in (("n_layers", n_layers), ("hidden", hidden), ("n_heads", n_heads),
                        ("seq_len", seq_len), ("micro_batch", micro_batch)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    return n_layers * ACTIVATIONS[mode](seq_len, micro_batch, hidden, n_heads)


def lora_params(n_layers: int, shapes: dict[str, tuple[int, int]], targets: list[str], r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on the linear layers ``targets`` ((in, out) in ``shapes``)."""
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"targets: expected names among {sorted(shapes)}, got unknown {unknown}")
    if r < 1:
        raise ValueError(f"r: expected a rank >= 1, got {r}")
    return n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)  # A: r×in, B: out×r
