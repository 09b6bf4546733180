"""Configurations of the four parameter-efficient fine-tuning methods, as help-annotated dataclasses.

  LoraConfig    W + (α/r)·B·A on chosen linear layers                     (Hu et al., 2021)
  PrefixConfig  learned keys/values in front of every layer's cache       (Li & Liang, 2021)
  AdapterConfig bottleneck MLP with a skip after attention and FFN        (Houlsby et al., 2019)
  IA3Config     learned vectors rescaling keys, values, FFN activations   (Liu et al., 2022, T-Few)

Which modules a method touches is said the way peft says it (``target_modules``):
  a list of names    a module is chosen when its name equals an entry or ends with "." + entry
  a string           a regular expression that must match the whole module name
  "all-linear"       every nn.Linear except the output head (as peft does)
and ``exclude_modules`` (same two forms) removes modules from that choice. Every field carries a
one-line help (``describe``); ``from_dict`` rejects unknown keys and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from nanomm.config import Config, describe, option

__all__ = ["PeftConfig", "LoraConfig", "PrefixConfig", "AdapterConfig", "IA3Config", "CONFIGS", "describe",
           "config_from_dict"]

ADAPTER_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def _check_names(name: str, value: Any, *, allow_none: bool) -> None:
    """A target spec: a regex string, or a non-empty list of non-empty name strings."""
    if value is None and allow_none:
        return
    if isinstance(value, str) and value:
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError(f"{name}: expected a regex string, 'all-linear' or a non-empty list of module names"
                     f"{' (or None)' if allow_none else ''}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclass
class PeftConfig(Config):
    """Shared behaviour: target-module specs checked, the method's name in the dict form."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in dataclasses.fields(self):
            if f.name in ("target_modules", "exclude_modules", "feedforward_modules"):
                value = getattr(self, f.name)
                _check_names(f.name, value, allow_none=f.name in ("exclude_modules", "feedforward_modules"))
                if isinstance(value, tuple):
                    setattr(self, f.name, list(value))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: y = W x + (α/r)·B·A·dropout(x), A (r, in) Kaiming-uniform, B (out, r) zeros."""

    method: ClassVar[str] = "lora"
    r: int = option(8, "rank of the update B·A")
    alpha: float = option(8.0, "α of the scale α/r (or α/√r with use_rslora); peft's lora_alpha")
    dropout: float = option(0.0, "dropout on the input of the low-rank path only (the frozen path sees x unchanged)")
    target_modules: Any = option(["q_proj", "v_proj"],
                             "modules to adapt: names (match the end of a module name), a regex, or 'all-linear'")
    exclude_modules: Any = option(None, "modules removed from the targets: names or a regex")
    use_rslora: bool = option(False, "scale by α/√r instead of α/r (rank-stabilised LoRA, Kalajdzievic 2023)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha: expected a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class PrefixConfig(PeftConfig):
    """Prefix tuning: P learned key/value vectors per layer and head, seen by every query."""

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = option(10, "P, the number of prefix positions in front of every layer's keys/values")
    projection: bool = option(False, "reparameterise the prefix by an MLP (embedding → Linear → tanh → Linear), "
                                 "Li & Liang §4.3; peft's prefix_projection")
    projection_hidden: Any = option(None, "hidden width of that MLP (None: the key/value width, as peft)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.projection_hidden is not None:
            _positive_int("projection_hidden", self.projection_hidden)


@dataclass
class AdapterConfig(PeftConfig):
    """Houlsby adapters: h + up(act(down(h))) on a sublayer's output h, up zero-initialised."""

    method: ClassVar[str] = "adapter"
    bottleneck: int = option(16, "width m of the bottleneck (Houlsby: m ≪ d)")
    activation: str = option("gelu", "nonlinearity between down- and up-projection", ADAPTER_ACTIVATIONS)
    target_modules: Any = option(["attn.o_proj", "mlp"],
                             "modules whose output gets an adapter: Houlsby puts one after the attention "
                             "output projection and one after the feed-forward network")
    exclude_modules: Any = option(None, "modules removed from the targets: names or a regex")

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("bottleneck", self.bottleneck)


@dataclass
class IA3Config(PeftConfig):
    """(IA)³: keys and values scaled by l_k, l_v; the FFN's inner activation by l_ff; all start at 1."""

    method: ClassVar[str] = "ia3"
    target_modules: Any = option(["k_proj", "v_proj", "down_proj", "fc_out"],
                             "modules to rescale: the output of key/value projections, the input of FFN "
                             "down-projections (names, a regex, or 'all-linear')")
    feedforward_modules: Any = option(["down_proj", "fc_out"],
                                  "targets whose INPUT is scaled (the FFN inner activation); the others "
                                  "have their output scaled. Must be a subset of the targets (None: no such module)")
    exclude_modules: Any = option(None, "modules removed from the targets: names or a regex")


CONFIGS: dict[str, type[PeftConfig]] = {
    "lora": LoraConfig, "prefix": PrefixConfig, "adapter": AdapterConfig, "ia3": IA3Config,
}


def config_from_dict(d: dict[str, Any]) -> PeftConfig:
    """The inverse of ``config.to_dict()``: the "method" key picks the class."""
    if not isinstance(d, dict) or d.get("method") not in CONFIGS:
        got = d.get("method") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"d: expected a dict with 'method' one of {list(CONFIGS)}, got {got!r}")
    rest = {k: v for k, v in d.items() if k != "method"}
    return CONFIGS[d["method"]].from_dict(rest)
