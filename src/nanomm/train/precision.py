"""Mixed-precision training: fp32 master weights, a 16-bit working model, loss scaling, fp32 islands.

Micikevicius et al., "Mixed Precision Training" (ICLR 2018):
  §3.1  the optimizer updates an fp32 master copy w; the model runs on w16 = round16(w). An update
        η·g smaller than half the spacing of w16 would vanish if applied to w16 directly.
  §3.2  loss scaling: backward of S·L, then g = g16 / S in fp32 (loss_scale.py).
  §3.3  arithmetic: products in 16-bit, but long reductions (softmax, norms, the loss) in fp32.

One optimizer step with MixedPrecision:

  with mp.autocast(): loss = objective(model, batch)     # w16 forward; FP32_POLICY ops run in fp32
  mp.backward(loss)                                      # (S·loss).backward() → g16 = S·∇ in model .grad
  mp.unscale_()                                          # master.grad = fp32(g16) / S; inf/NaN check
  clip_grad_norm_(mp.parameters(), 1.0)                  # optional, on true fp32 gradients
  mp.step(optimizer)                                     # skip on inf/NaN, else step and w16 ← round16(w)

The optimizer is built over mp.parameters() (the fp32 masters). Model states per parameter are
2 (w16) + 2 (g16) + 4 (w) + 8 (Adam m, v) = 16 B, the same as fp32 training's 4 + 4 + 8 (ZeRO §3.1):
mixed precision halves activations and bandwidth, not the optimizer's memory.

The fp32 islands: torch.autocast keeps a list of ops in fp32, but its CPU list holds only losses and a
few reductions (softmax and layer_norm stay 16-bit there; its CUDA list has them). nanomm's policy is
its own table, FP32_POLICY, applied with a TorchFunctionMode: every call of a listed function gets
its 16-bit tensor arguments cast to fp32; normalisations and softmax cast the result back (the next
matmul wants 16-bit), losses return fp32. Fused kernels (sdpa) are not intercepted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from nanomm.train.loss_scale import SCALERS, make_scaler

__all__ = ["FLOAT_FORMATS", "FloatFormat", "float_format", "Precision", "PRECISIONS", "get_precision",
           "FP32_POLICY", "Fp32Policy", "MixedPrecision", "underflow_fraction"]


# name -> (exponent bits, mantissa bits) of the binary formats: IEEE 754 binary32/binary16, and bfloat16
FLOAT_FORMATS: dict[str, tuple[int, int]] = {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}


@dataclass(frozen=True)
class FloatFormat:
    exponent_bits: int
    mantissa_bits: int
    max: float  # (2 − 2⁻ᵐ)·2^bias
    min_normal: float  # 2^(1−bias)
    min_subnormal: float  # 2^(1−bias−m): below half of it, a value rounds to 0
    eps: float  # 2⁻ᵐ, the spacing just above 1


def float_format(name: str) -> FloatFormat:
    """The range and precision of a format, derived from its bit layout (bias = 2^(e−1) − 1)."""
    if name not in FLOAT_FORMATS:
        raise ValueError(f"name: expected one of {sorted(FLOAT_FORMATS)}, got {name!r}")
    e, m = FLOAT_FORMATS[name]
    bias = 2 ** (e - 1) - 1
    return FloatFormat(e, m, (2 - 2.0**-m) * 2.0**bias, 2.0 ** (1 - bias), 2.0 ** (1 - bias - m), 2.0**-m)


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # the working copy's dtype: forward, backward, gradients
    scaler: str  # the default loss scaler (loss_scale.SCALERS)
    master_weights: bool  # keep an fp32 copy for the optimizer


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, "static", False),
    "bf16": Precision("bf16", torch.bfloat16, "static", True),  # fp32's 8 exponent bits: nothing underflows
    "fp16": Precision("fp16", torch.float16, "dynamic", True),
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


# op -> (the Python callables that reach it, dtype of the result, why it needs fp32)
#   result "input": cast back to the 16-bit dtype of the inputs; "fp32": keep fp32 (losses feed backward(S·L))
FP32_POLICY: dict[str, tuple[tuple[Callable, ...], str, str]] = {
    "softmax": ((F.softmax, torch.softmax, Tensor.softmax), "input",
                "exp overflows fp16 above 11.09; the row sum is a long reduction"),
    "log_softmax": ((F.log_softmax, torch.log_softmax, Tensor.log_softmax), "input", "log-sum-exp over a row"),
    "layer_norm": ((F.layer_norm, torch.layer_norm), "input",
                   "mean and variance sum d values; sum x² overflows fp16 for |x| ≈ 256/√d"),
    "rms_norm": ((F.rms_norm, torch.rms_norm), "input", "mean(x²) over d values"),
    "group_norm": ((F.group_norm, torch.group_norm), "input", "mean and variance over a group"),
    "cross_entropy": ((F.cross_entropy,), "fp32", "log-sum-exp per token, then a mean over all tokens"),
    "nll_loss": ((F.nll_loss,), "fp32", "a mean over all tokens"),
    "binary_cross_entropy_with_logits": ((F.binary_cross_entropy_with_logits,), "fp32",
                                         "log(1 + e^-x) and a mean; 1 − 1e-7 rounds to 1 in fp16"),
    "mse_loss": ((F.mse_loss,), "fp32", "squares overflow past 256; a mean"),
    "kl_div": ((F.kl_div,), "fp32", "a sum of p·log(p/q)"),
}
_RULE = {fn: rule for fns, rule, _ in FP32_POLICY.values() for fn in fns}
_CAST_BACK: dict[str, Callable[[Tensor, torch.dtype], Tensor]] = {
    "input": lambda out, low: out.to(low),
    "fp32": lambda out, low: out,
}


class Fp32Policy(TorchFunctionMode):
    """Inside this context, the FP32_POLICY ops compute in fp32 when given `low`-dtype tensors."""

    def __init__(self, low: torch.dtype):
        super().__init__()
        if low not in (torch.float16, torch.bfloat16):
            raise ValueError(f"low: expected torch.float16 or torch.bfloat16, got {low}")
        self.low = low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULE.get(func)
        if rule is None:
            return func(*args, **kwargs)
        up = lambda t: t.float() if isinstance(t, Tensor) and t.dtype == self.low else t  # noqa: E731
        had_low = any(isinstance(t, Tensor) and t.dtype == self.low for t in (*args, *kwargs.values()))
        out = func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})  # the mode is off inside
        return _CAST_BACK[rule](out, self.low) if had_low else out


def underflow_fraction(grads: Iterable[Tensor | None], reference: Iterable[Tensor | None]) -> float:
    """Among the entries whose reference (fp32) gradient is non-zero, the fraction that are exactly 0."""
    lost = total = 0
    for i, (g, r) in enumerate(zip(grads, reference, strict=True)):
        if r is None:
            continue
        if g is not None and g.shape != r.shape:
            raise ValueError(f"grads[{i}]: expected shape {tuple(r.shape)} like reference, got {tuple(g.shape)}")
        live = r != 0
        total += int(live.sum())
        lost += int(live.sum()) if g is None else int((live & (g == 0)).sum())
    if total == 0:
        raise ValueError("reference: expected at least one non-zero gradient entry, got none")
    return lost / total


class MixedPrecision:
    """An fp32 master copy of `model`'s trainable weights, the model cast in place to the working dtype,
    and a loss scaler. Give the optimizer ``mp.parameters()``."""

    def __init__(self, model: nn.Module, precision: str = "fp32", *, loss_scale: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.precision = get_precision(precision)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: expected at least one trainable parameter, got none")
        self.scaler = make_scaler(loss_scale, self.precision.scaler)
        self._names = [n for n, _ in named]
        # copied before the cast, so the masters start from the exact fp32 values
        masters = None
        if self.precision.master_weights:
            masters = [nn.Parameter(p.detach().float().clone()) for _, p in named]
        self.model = model.to(self.precision.dtype)  # floating parameters and buffers only
        self._work = [p for p in model.parameters() if p.requires_grad]
        self._masters = masters if masters is not None else self._work
        self._found_inf: bool | None = None  # set by unscale_, cleared by step

    @property
    def separate(self) -> bool:
        return self._masters is not self._work

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def scale(self) -> float:
        return self.scaler.scale

    def parameters(self) -> list[nn.Parameter]:
        """The fp32 tensors the optimizer updates (the model's own parameters in fp32 mode)."""
        return list(self._masters)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return zip(self._names, self._masters)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for the forward pass and the loss: FP32_POLICY ops in fp32."""
        return contextlib.nullcontext() if self.dtype == torch.float32 else Fp32Policy(self.dtype)

    def backward(self, loss: Tensor) -> None:
        """Backward of S·loss; call it once per micro-batch (gradients accumulate in the working dtype)."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss: expected a torch.Tensor, got {type(loss).__name__}")
        if loss.dim() != 0 or not loss.requires_grad:
            raise ValueError(f"loss: expected a scalar that requires grad, got shape {tuple(loss.shape)} "
                             f"with requires_grad={loss.requires_grad}")
        self._found_inf = None
        (loss.float() * self.scaler.scale).backward()  # S·L in fp32: the product itself must not overflow

    @torch.no_grad()
    def unscale_(self) -> bool:
        """Move g16/S into the fp32 masters' .grad (once per step); return True if any is inf or NaN."""
        if self._found_inf is not None:
            return self._found_inf
        inv = 1.0 / self.scaler.scale
        bad = torch.zeros((), dtype=torch.bool)
        for work, master in zip(self._work, self._masters):
            if work.grad is None:
                master.grad = None
                continue
            g = work.grad.float()  # a copy for 16-bit grads, the same tensor in fp32 mode
            if inv != 1.0:
                g.mul_(inv)  # in fp32: dividing in fp16 would underflow again
            bad |= ~torch.isfinite(g).all()
            if self.separate:
                master.grad, work.grad = g, None
        self._found_inf = bool(bad)
        return self._found_inf

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale, then step and refresh the working copy, or skip if a gradient overflowed.
        Updates the loss scale, clears every gradient, returns whether the step was taken."""
        ours = {id(p) for p in self._masters}
        if any(id(p) not in ours for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer: expected it to be built over mp.parameters() (the fp32 masters), "
                             "got one holding other tensors")
        found_inf = self.unscale_()
        if not found_inf:
            optimizer.step()
            if self.separate:
                for work, master in zip(self._work, self._masters):
                    work.copy_(master)  # round to the working dtype
        self.scaler.update(found_inf)
        self.zero_grad()
        return not found_inf

    def zero_grad(self) -> None:
        for p in (*self._work, *self._masters):
            p.grad = None
        self._found_inf = None

    def state_dict(self) -> dict[str, Any]:
        """precision, scaler (JSON-able) and masters (name -> fp32 tensor; empty in fp32 mode, where the
        model's weights are the masters). The optimizer's state is saved separately, as usual."""
        masters = {n: m.detach().clone() for n, m in self.named_parameters()} if self.separate else {}
        return {"precision": self.precision.name, "scaler": self.scaler.state_dict(), "masters": masters}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("precision") != self.precision.name:
            raise ValueError(f"state['precision']: expected {self.precision.name!r} like this MixedPrecision, "
                             f"got {state.get('precision')!r}")
        kind = state["scaler"].get("kind")
        if kind not in SCALERS:
            raise ValueError(f"state['scaler']['kind']: expected one of {sorted(SCALERS)}, got {kind!r}")
        if self.separate:
            self._load_masters(state["masters"])
        scaler = SCALERS[kind]()
        scaler.load_state_dict(state["scaler"])
        self.scaler = scaler
        self.zero_grad()

    def _load_masters(self, masters: dict[str, Tensor]) -> None:
        if sorted(masters) != sorted(self._names):
            raise ValueError(f"state['masters']: expected the keys {sorted(self._names)}, got {sorted(masters)}")
        for name, master in self.named_parameters():
            if masters[name].shape != master.shape:
                raise ValueError(f"state['masters'][{name!r}]: expected shape {tuple(master.shape)}, "
                                 f"got {tuple(masters[name].shape)}")
        for (name, master), work in zip(self.named_parameters(), self._work):
            master.copy_(masters[name])  # in place: the optimizer keeps its references
            work.copy_(master)

    def __repr__(self) -> str:
        return f"MixedPrecision({self.precision.name}, {self.scaler!r}, {len(self._masters)} tensors)"
