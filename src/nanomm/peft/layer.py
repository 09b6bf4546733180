"""What every PEFT method shares: choosing the modules to adapt, and the wrapper they become.

Selection follows peft's rules so a config means the same thing in both libraries:
  list of names   module name == entry, or ends with "." + entry   ("q_proj" takes blocks.3.attn.q_proj)
  string          re.fullmatch(pattern, module name)
  "all-linear"    every nn.Linear but the output head (lm_head, BERT's tied MLM decoder)
``exclude_modules`` removes modules with the same two rules. A target that is not of the kind a
method can wrap is an error, not a silent skip; so is a selection that matches nothing.

A chosen module is replaced in its parent by a ``PeftLayer`` that holds the original as ``base``, so
the model's own forward code is untouched: attention still calls ``self.k_proj(x)``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

__all__ = ["PeftLayer", "OUTPUT_HEADS", "matches", "select_modules", "replace_module", "wrap_modules", "peft_layers"]

# names of output heads in nanomm's models; "all-linear" leaves them alone, as peft does
OUTPUT_HEADS = ("lm_head", "mlm.decoder")


class PeftLayer(nn.Module):
    """A module wrapped by a PEFT method. ``enabled`` False gives the base module's output exactly."""

    mergeable: bool = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.enabled = True
        self.merged = False

    @property
    def weight(self):  # code that reads q_proj.weight keeps working on a wrapped layer
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def merge(self, safe: bool = True) -> None:
        raise ValueError(f"{type(self).__name__}: this adapter is not a linear change of the weights; "
                         "it cannot be merged")

    def unmerge(self) -> None:
        raise ValueError(f"{type(self).__name__}: cannot be merged, so there is nothing to unmerge")


def _spec_matches(spec: Any, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def matches(spec: Any, name: str) -> bool:
    """Whether module ``name`` is chosen by ``spec`` (a list of names or a regex); None matches nothing."""
    return spec is not None and _spec_matches(spec, name)


def _is_output_head(name: str) -> bool:
    return name in OUTPUT_HEADS or name.endswith(tuple("." + h for h in OUTPUT_HEADS))


def select_modules(model: nn.Module, target_modules: Any, exclude_modules: Any = None, *,
                   kinds: tuple[type, ...] = (nn.Linear,), what: str = "nn.Linear") -> list[str]:
    """Names of the modules of ``model`` chosen by ``target_modules`` minus ``exclude_modules``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if any(isinstance(m, PeftLayer) for m in modules.values()):
        raise ValueError("model: already has PEFT layers; merge_and_unload() or unload() it before applying again")
    if target_modules == "all-linear":
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not _is_output_head(n)]
    else:
        chosen = [n for n in modules if n and matches(target_modules, n)]
    chosen = [n for n in chosen if not matches(exclude_modules, n)]
    if not chosen:
        sample = [n for n, m in modules.items() if isinstance(m, kinds)][:12]
        raise ValueError(f"target_modules: {target_modules!r} (excluding {exclude_modules!r}) matches no module "
                         f"of {type(model).__name__}; some {what} modules are {sample}")
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not isinstance(modules[n], kinds)]
    if wrong:
        raise TypeError(f"target_modules: expected {what} modules only, got {wrong}")
    nested = [(a, b) for a in chosen for b in chosen if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"target_modules: chooses modules inside other chosen modules, e.g. {nested[0]}; "
                         "choose one of each pair")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` sits (its parent's attribute)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_modules(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], PeftLayer]) -> None:
    for name in names:
        replace_module(model, name, make(name, model.get_submodule(name)))


def peft_layers(model: nn.Module) -> dict[str, PeftLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PeftLayer)}
