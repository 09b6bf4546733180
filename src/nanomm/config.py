"""Help-annotated dataclass configs: the one mechanism behind every config of nanomm.

    @dataclass
    class DPOConfig(Config):
        beta: float = option(0.1, "β, the KL-penalty coefficient")
        loss: str = option("sigmoid", "the loss", choices=("sigmoid", "ipo", "hinge"))

``option`` gives a field its one-line help (``describe`` lists them, the CLI shows them) and, where the
values form a closed set, its ``choices``, checked on construction. ``from_dict`` rejects unknown keys
and names the valid ones, so a typo in a JSON config is an error instead of a silently ignored knob.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Config", "option", "describe"]

C = TypeVar("C", bound="Config")


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with a one-line help and, optionally, its allowed values."""
    meta = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Base of the config dataclasses: choices checked, dict round trip, copies with changes."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: expected one of {list(choices)}, got {getattr(self, f.name)!r}")

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a dict; unknown keys are an error that lists the valid ones."""
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {valid}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated like ``from_dict``."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})


def describe(config: Config | type[Config]) -> dict[str, str]:
    """field name -> its one-line help (with the allowed values where there is a closed set)."""
    out = {}
    for f in dataclasses.fields(config):
        text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            text += f" (one of {', '.join(map(str, f.metadata['choices']))})"
        out[f.name] = text
    return out
