"""Loss scaling: multiply the loss by S before backward so small fp16 gradients stay representable.

fp16 flushes anything below 2⁻²⁴ ≈ 6·10⁻⁸ to zero, and many gradients of a real network live there
(Micikevicius et al., "Mixed Precision Training", ICLR 2018, §3.2 and Fig. 3). By the chain rule,
backpropagating S·L gives S·∇L: the whole histogram moves up by log2 S binades. The fp32 master
gradients are then divided by S before the optimizer sees them, so the update is unchanged.

  static    S fixed (the paper: 8 to 32768; the notes: "e.g. 1024")
  dynamic   start high, S ← S·backoff on an inf/NaN gradient (and skip that step),
            S ← S·growth after `growth_interval` consecutive clean steps

The dynamic rule, with its defaults, is torch.amp.GradScaler's: init 2¹⁶, ×2 after 2000 clean steps,
×0.5 on overflow. Two options come from DeepSpeed's DynamicLossScaler:
  hysteresis h           lower S only on the h-th overflow, absorbing h − 1 (each still skips its step);
                         the budget refills when S grows, or on every clean step with consecutive_hysteresis;
                         once spent, every further overflow lowers S until it refills
  min_scale              S never goes below this floor (raise_at_min_scale: stop instead of skipping forever)

DeepSpeed fp16 config keys → DynamicLossScaler (see from_deepspeed):
  loss_scale: 0 → dynamic, > 0 → static S    initial_scale_power: p → init_scale = 2**p (default 16)
  loss_scale_window → growth_interval (1000)  hysteresis → hysteresis (2)
  consecutive_hysteresis (false)               min_loss_scale → min_scale (1)
DeepSpeed uses one scale_factor (2) for growth and 1/backoff. One difference remains: DeepSpeed (0.19.8,
tested) grows on the (window+1)-th clean step after a start or an overflow; nanomm and torch on the
window-th. A step with inf/NaN gradients is skipped with either scaler (DeepSpeed's static one does
not check; applying an inf would ruin the weights for good).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["LossScaler", "StaticLossScaler", "DynamicLossScaler", "SCALERS", "from_deepspeed", "make_scaler"]

FLOAT32_MAX = torch.finfo(torch.float32).max  # torch keeps S in a float32 tensor; growth stops before inf


class LossScaler(Protocol):
    """What MixedPrecision needs from a scaler."""

    @property
    def scale(self) -> float: ...
    def update(self, found_inf: bool) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    return float(v)


def _count(name: str, v: Any, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    return v


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state: expected the state_dict of a {kind} loss scaler, got kind {got!r}")


class StaticLossScaler:
    """A fixed S. Overflowing steps are still skipped by MixedPrecision (applying inf would ruin the weights)."""

    kind = "static"

    def __init__(self, scale: float = 1.0):
        self._scale = _positive("loss_scale", scale)

    @property
    def scale(self) -> float:
        return self._scale

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self._scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._scale = _positive("state['scale']", state["scale"])

    def __repr__(self) -> str:
        return f"StaticLossScaler(scale={self._scale:g})"


class DynamicLossScaler:
    """S backs off on overflow and grows after `growth_interval` clean steps (GradScaler's rule),
    with DeepSpeed's hysteresis and floor. Defaults are torch's; from_deepspeed gives DeepSpeed's."""

    kind = "dynamic"
    _CONFIG = ("growth_factor", "backoff_factor", "growth_interval", "hysteresis", "consecutive_hysteresis",
               "min_scale", "raise_at_min_scale")

    def __init__(self, init_scale: float = 2.0**16, *, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, hysteresis: int = 1, consecutive_hysteresis: bool = False,
                 min_scale: float = 0.0, raise_at_min_scale: bool = False):
        self._scale = _positive("init_scale", init_scale)
        if not _positive("growth_factor", growth_factor) > 1:
            raise ValueError(f"growth_factor: expected a number > 1, got {growth_factor!r}")
        if not 0 < _positive("backoff_factor", backoff_factor) < 1:
            raise ValueError(f"backoff_factor: expected a number in (0, 1), got {backoff_factor!r}")
        if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 <= min_scale <= init_scale:
            raise ValueError(f"min_scale: expected a number in [0, init_scale={init_scale!r}], got {min_scale!r}")
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = _count("growth_interval", growth_interval)
        self.hysteresis = _count("hysteresis", hysteresis)
        self.consecutive_hysteresis, self.raise_at_min_scale = bool(consecutive_hysteresis), bool(raise_at_min_scale)
        self.min_scale = float(min_scale)
        self._clean_steps = 0  # consecutive clean steps since the last growth or overflow (GradScaler's tracker)
        self._hysteresis_left = self.hysteresis  # overflows still tolerated before S is lowered

    @property
    def scale(self) -> float:
        return self._scale

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self._scale

    def update(self, found_inf: bool) -> None:
        """Record one optimizer step: `found_inf` says whether its gradients held an inf or NaN."""
        if found_inf:
            self._clean_steps = 0
            if self._hysteresis_left > 1:  # DeepSpeed: the budget absorbs this overflow, S stays
                self._hysteresis_left -= 1
                return
            if self.raise_at_min_scale and self._scale <= self.min_scale:
                raise FloatingPointError(f"loss scale is at its floor min_scale={self.min_scale:g} and the "
                                         "gradients still overflow: the run is diverging")
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        if self.consecutive_hysteresis:
            self._hysteresis_left = self.hysteresis
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self._clean_steps = 0
            self._hysteresis_left = self.hysteresis
            grown = self._scale * self.growth_factor
            if grown <= FLOAT32_MAX:
                self._scale = grown

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the scale, the two counters and the configuration."""
        return {"kind": self.kind, "scale": self._scale, "clean_steps": self._clean_steps,
                "hysteresis_left": self._hysteresis_left, **{k: getattr(self, k) for k in self._CONFIG}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        missing = [k for k in ("scale", "clean_steps", "hysteresis_left", *self._CONFIG) if k not in state]
        if missing:
            raise ValueError(f"state: missing keys {missing}")
        fresh = DynamicLossScaler(state["scale"], **{k: state[k] for k in self._CONFIG})  # validates the values
        fresh._clean_steps = _count("state['clean_steps']", state["clean_steps"], 0)
        fresh._hysteresis_left = _count("state['hysteresis_left']", state["hysteresis_left"], 1)
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (f"DynamicLossScaler(scale={self._scale:g}, growth_interval={self.growth_interval}, "
                f"hysteresis={self.hysteresis}, min_scale={self.min_scale:g})")


SCALERS: dict[str, type] = {"static": StaticLossScaler, "dynamic": DynamicLossScaler}

# DeepSpeed "fp16" keys that are not about the scaler; accepted and ignored here
_DS_OTHER_KEYS = {"enabled", "auto_cast", "fp16_master_weights_and_grads"}
_DS_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                "consecutive_hysteresis": False, "min_loss_scale": 1}


def from_deepspeed(fp16: dict[str, Any]) -> StaticLossScaler | DynamicLossScaler:
    """The scaler a DeepSpeed ``"fp16": {...}`` config section describes, with DeepSpeed's defaults."""
    if not isinstance(fp16, dict):
        raise TypeError(f"fp16: expected a dict (DeepSpeed's fp16 section), got {type(fp16).__name__}")
    unknown = sorted(set(fp16) - set(_DS_DEFAULTS) - _DS_OTHER_KEYS)
    if unknown:
        raise ValueError(f"fp16: unknown keys {unknown}; valid: {sorted(set(_DS_DEFAULTS) | _DS_OTHER_KEYS)}")
    c = {**_DS_DEFAULTS, **fp16}
    if isinstance(c["loss_scale"], bool) or not isinstance(c["loss_scale"], (int, float)) or not c["loss_scale"] >= 0:
        raise ValueError(f"fp16['loss_scale']: expected 0 (dynamic) or a number > 0 (static), got {c['loss_scale']!r}")
    if c["loss_scale"] > 0:
        return StaticLossScaler(c["loss_scale"])
    power = c["initial_scale_power"]
    if isinstance(power, bool) or not isinstance(power, int) or not 0 <= power <= 127:
        raise ValueError(f"fp16['initial_scale_power']: expected an int in [0, 127], got {power!r}")
    return DynamicLossScaler(2.0**power, growth_factor=2.0, backoff_factor=0.5,
                             growth_interval=c["loss_scale_window"], hysteresis=c["hysteresis"],
                             consecutive_hysteresis=c["consecutive_hysteresis"], min_scale=c["min_loss_scale"])


def make_scaler(loss_scale: Any, default: str = "static") -> StaticLossScaler | DynamicLossScaler:
    """A scaler from a user setting: None (the precision's default), a number S > 0 (static),
    "static" (S = 1) or "dynamic" (torch's defaults), a DeepSpeed fp16 dict, or a scaler object."""
    if loss_scale is None:
        loss_scale = default
    if isinstance(loss_scale, str):
        if loss_scale not in SCALERS:
            raise ValueError(f"loss_scale: expected one of {sorted(SCALERS)}, a number > 0 or a DeepSpeed "
                             f"fp16 dict, got {loss_scale!r}")
        return SCALERS[loss_scale]()
    if isinstance(loss_scale, dict):
        return from_deepspeed(loss_scale)
    if isinstance(loss_scale, (StaticLossScaler, DynamicLossScaler)):
        return loss_scale
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise TypeError(f"loss_scale: expected None, a number, 'static', 'dynamic', a dict or a scaler, "
                        f"got {type(loss_scale).__name__}")
    return StaticLossScaler(loss_scale)
