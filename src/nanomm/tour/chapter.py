"""What a tour chapter produces: claims of the notes checked against nanomm's own code, and a demo.

A chapter is a module in ``nanomm.tour.chapters`` with ``ID``, ``TITLE`` and ``run(ctx) -> Chapter``.
Every figure on a claim is computed by nanomm at run time; the notes' figure is quoted verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Verdict = Literal["holds", "approx", "wrong", "unverifiable"]
VERDICTS: tuple[str, ...] = ("holds", "approx", "wrong", "unverifiable")


@dataclass
class Claim:
    """One checkable statement of the notes, beside the value nanomm computes."""

    claim: str  # what the notes assert, in English
    notes: str  # the notes' own figure or wording
    nanomm: str  # what nanomm's code gives (computed, never typed in)
    verdict: Verdict
    source: str  # the primary source for the correct value

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass
class Chapter:
    """The result of running one chapter of the tour."""

    claims: list[Claim] = field(default_factory=list)
    demo: dict[str, float] = field(default_factory=dict)  # measured numbers of the live demo
    lines: list[str] = field(default_factory=list)  # short prose shown under the chapter (markdown)
    plots: list[Path] = field(default_factory=list)  # PNG files written under ctx.out


@dataclass
class TourContext:
    """Passed to each chapter's ``run``."""

    out: Path  # folder for report files; plots go here
    quick: bool = False  # smaller demos, for CI and a first look
    seed: int = 0

    def plot_path(self, name: str) -> Path:
        """Where a chapter saves a PNG called ``name`` (without extension)."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / f"{name}.png"
