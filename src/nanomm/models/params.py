"""Analytic parameter counts, and the size table beside the notes' figures.

Per transformer layer of width d, feed-forward width f, with biases (BERT, GPT):
    attention  4d² + 4d          (q, k, v, o projections)
    MLP        2df + f + d       (two linear layers)
    norms      2 · 2d            (two LayerNorms, weight and bias)
LLaMA drops every bias, shrinks k/v to the key/value heads (GQA), has three SwiGLU matrices (3df)
and RMSNorms with a weight only (d each). Embeddings add V·d (+ P·d learned positions, + 2d
segments for BERT). A tied head costs nothing; an untied one V·d.

``count_params`` gives the total and a breakdown; ``nanomm.models.build(config, device="meta")``
counts the same numbers from real modules (the tests hold the two equal for every preset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from nanomm.models.config import BertConfig, GPTConfig, LlamaConfig, ModelConfig, preset, preset_names

__all__ = ["ParamCount", "count_params", "NOTES_SIZES", "NotesSize", "ParamsRow", "params_rows",
           "print_params_table", "size_verdict", "human"]

PARTS = ("embeddings", "attention", "mlp", "norms", "head", "pooler", "pretraining_heads")


@dataclass
class ParamCount:
    """Total parameters and where they sit (keys of PARTS; zero parts included)."""

    total: int
    breakdown: dict[str, int] = field(default_factory=dict)


def _positions(config: GPTConfig | LlamaConfig) -> int:
    # only a learned table holds parameters; sinusoidal, ALiBi and RoPE are formulas
    return config.max_positions * config.dim if config.position == "learned" else 0


def _bert(c: BertConfig) -> dict[str, int]:
    d, f, V, L = c.dim, c.ff_dim, c.vocab_size, c.n_layer
    heads = 0
    if c.task == "pretraining":
        # MLM transform (dense + LayerNorm) + decoder bias (its weight is the token embedding) + NSP
        heads = (d * d + d) + 2 * d + V + (2 * d + 2)
    return dict(
        embeddings=(V + c.max_positions + c.type_vocab_size) * d,
        attention=L * (4 * d * d + 4 * d),
        mlp=L * (2 * d * f + f + d),
        norms=L * 4 * d + 2 * d,  # two LayerNorms per layer + the embedding LayerNorm
        head=0,
        pooler=d * d + d if c.pooler else 0,
        pretraining_heads=heads,
    )


def _gpt(c: GPTConfig) -> dict[str, int]:
    d, f, V, L, b = c.dim, c.ff_dim, c.vocab_size, c.n_layer, int(c.bias)
    ln = 2 * d if c.bias else d
    return dict(
        embeddings=V * d + _positions(c),
        attention=L * (4 * d * d + b * 4 * d),
        mlp=L * (2 * d * f + b * (f + d)),
        norms=L * 2 * ln + (ln if c.final_norm else 0),
        head=0 if c.tie_embeddings else V * d,
        pooler=0,
        pretraining_heads=0,
    )


def _llama(c: LlamaConfig) -> dict[str, int]:
    d, f, V, L = c.dim, c.ff_dim, c.vocab_size, c.n_layer
    kv = c.n_kv_head * c.head_dim
    return dict(
        embeddings=V * d + _positions(c),
        attention=L * (2 * d * d + 2 * d * kv),  # q and o full width, k and v only Hkv heads
        mlp=L * 3 * d * f,  # gate, up, down
        norms=L * 2 * d + d,
        head=0 if c.tie_embeddings else V * d,
        pooler=0,
        pretraining_heads=0,
    )


_COUNTERS: dict[type, Callable[..., dict[str, int]]] = {BertConfig: _bert, GPTConfig: _gpt, LlamaConfig: _llama}


def count_params(config: ModelConfig) -> ParamCount:
    """Parameters of the model ``build(config)`` makes, counted from the config alone."""
    if type(config) not in _COUNTERS:
        raise TypeError(f"config: expected one of {[t.__name__ for t in _COUNTERS]}, got {type(config).__name__}")
    parts = _COUNTERS[type(config)](config)
    return ParamCount(total=sum(parts.values()), breakdown=parts)


# ----------------------------------------------------------------------------- the notes' figures

@dataclass(frozen=True)
class NotesSize:
    """A size the notes quote. kind 'count' claims a parameter count at the stated precision;
    kind 'label' is the size the authors name the model by (GPT-2 '1.5B', LLaMA '7B')."""

    text: str
    value: float
    kind: str
    source: str
    compare: dict = field(default_factory=dict)  # config overrides of the model the figure describes


NOTES_SIZES: dict[str, NotesSize] = {
    "bert-base": NotesSize("110M", 110e6, "count", "BERT paper §3; BertModel with pooler", {"task": "base"}),
    "bert-large": NotesSize("340M", 340e6, "count", "BERT paper §3; BertModel with pooler", {"task": "base"}),
    "gpt1": NotesSize("117M", 117e6, "count", "GPT-1: 12×768, vocab 40478, 512 positions, tied head"),
    "gpt2-xl": NotesSize("1.5B", 1.5e9, "label", "GPT-2 paper Table 2 (listed there as 1542M)"),
    "gpt3-175b": NotesSize("175B", 175e9, "label", "GPT-3 paper Table 2.1"),
    "llama-7b": NotesSize("7B", 7e9, "label", "LLaMA paper Table 2 (6.7B)"),
}

# a count claim holds when within 0.1% (it agrees in its stated digits), is approx within 1%;
# a size label holds within 5% (it names a size class, not a count)
_TOLERANCES: dict[str, tuple[float, float]] = {"count": (0.001, 0.01), "label": (0.05, 0.10)}


def size_verdict(notes: NotesSize, computed: int) -> str:
    """'holds', 'approx' or 'wrong' for a quoted size against the exact count."""
    holds, approx = _TOLERANCES[notes.kind]
    err = abs(notes.value / computed - 1.0)
    return "holds" if err <= holds else "approx" if err <= approx else "wrong"


@dataclass
class ParamsRow:
    preset: str
    total: int  # parameters of build(preset(name))
    breakdown: dict[str, int]
    compared: int | None  # the count the notes' figure is checked against
    notes: str | None
    verdict: str | None
    error: float | None  # notes / compared − 1


def params_rows(names: list[str] | None = None) -> list[ParamsRow]:
    """One row per preset (all presets when ``names`` is empty)."""
    names = list(names) if names else preset_names()
    rows = []
    for name in names:
        config = preset(name)  # raises on an unknown name, listing the valid ones
        count = count_params(config)
        notes = NOTES_SIZES.get(name)
        compared = verdict = error = None
        if notes is not None:
            compared = count_params(config.replace(**notes.compare)).total
            verdict, error = size_verdict(notes, compared), notes.value / compared - 1.0
        rows.append(ParamsRow(name, count.total, count.breakdown, compared, notes.text if notes else None,
                              verdict, error))
    return rows


def human(n: float) -> str:
    """124439808 -> '124.4M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


_SHORT = {"embeddings": "emb", "attention": "attn", "mlp": "mlp", "norms": "norm", "head": "head",
          "pooler": "pooler", "pretraining_heads": "mlm+nsp"}


def print_params_table(names: list[str]) -> None:
    """Print the size tables (rich): exact counts beside the notes' figures, then the breakdowns.

    ``compared`` is the model the notes' figure describes (BERT: the encoder with pooler); an empty
    ``names`` prints every preset.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = params_rows(names)
    sizes = Table(title="Parameters: nanomm (analytic = built on meta) vs the notes", box=box.SIMPLE_HEAD)
    for col in ("preset", "parameters", "compared", "notes", "verdict"):
        sizes.add_column(col, justify="right" if col in ("parameters", "compared") else "left", no_wrap=True)
    colour = {"holds": "green", "approx": "yellow", "wrong": "red"}
    for r in rows:
        verdict = f"[{colour[r.verdict]}]{r.verdict}[/] {r.error:+.2%}" if r.verdict else "—"
        sizes.add_row(r.preset, f"{r.total:,}", f"{r.compared:,}" if r.compared else "—", r.notes or "—", verdict)
    parts = Table(title="Where the parameters are", box=box.SIMPLE_HEAD)
    parts.add_column("preset", no_wrap=True)
    for key in PARTS:
        parts.add_column(_SHORT[key], justify="right", no_wrap=True)
    for r in rows:
        parts.add_row(r.preset, *(human(r.breakdown[k]) if r.breakdown[k] else "·" for k in PARTS))
    console = Console()
    console.print(sizes)
    console.print(parts)
