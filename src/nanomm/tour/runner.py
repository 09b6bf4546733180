"""Runs the chapters of the tour in order, prints each as it finishes, writes report.md and report.json."""

from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from nanomm.io import write_json, write_text
from nanomm.tour.chapter import Chapter, TourContext

# The notes' 19 topics in their order: id -> (title, chapter module under nanomm.tour.chapters).
TOPICS: dict[int, tuple[str, str]] = {
    1: ("DPO", "ch01_dpo"),
    2: ("GPT and BERT: structure and sizes", "ch02_gpt_bert_sizes"),
    3: ("FlashAttention", "ch03_flash_attention"),
    4: ("BERT pretraining and embeddings", "ch04_bert_pretraining"),
    5: ("FP16 training", "ch05_fp16"),
    6: ("Q-Former", "ch06_qformer"),
    7: ("Position encodings", "ch07_position_encodings"),
    8: ("CLIP", "ch08_clip"),
    9: ("BLIP-2", "ch09_blip2"),
    10: ("Pretrain vs SFT vs LoRA", "ch10_pretrain_sft_lora"),
    11: ("LLaMA vs LLaVA", "ch11_llama_llava"),
    12: ("BCE and InfoNCE", "ch12_bce_infonce"),
    13: ("Hallucination", "ch13_hallucination"),
    14: ("Mixed precision", "ch14_mixed_precision"),
    15: ("Why decoder-only; the KV cache", "ch15_decoder_only"),
    16: ("RMSNorm", "ch16_rmsnorm"),
    17: ("DeepSpeed and ZeRO", "ch17_zero"),
    18: ("PEFT: LoRA, prefix, adapter, IA3", "ch18_peft"),
    19: ("RAG", "ch19_rag"),
}

NOT_IMPLEMENTED = "not yet implemented"
VERDICT_STYLE = {"holds": "green", "approx": "yellow", "wrong": "bold red", "unverifiable": "magenta"}


@dataclass
class TopicReport:
    id: int
    title: str
    status: str  # "ok" | "not yet implemented" | "error"
    claims: list[dict] = field(default_factory=list)
    demo: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def _load_chapter(module: str):
    name = f"nanomm.tour.chapters.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:  # the chapter itself is missing, not something it imports
            return None
        raise


def run_chapter(topic: int, ctx: TourContext) -> TopicReport:
    title, module = TOPICS[topic]
    mod = _load_chapter(module)
    if mod is None:
        return TopicReport(topic, title, NOT_IMPLEMENTED)
    start, threads = time.perf_counter(), torch.get_num_threads()
    # the demos are tiny: intra-op threads buy nothing, and on a shared CPU each OpenMP barrier can cost a
    # scheduler slice (an fp16 bmm took 2.5 s with 2 threads under load, 0.7 ms with 1)
    torch.set_num_threads(1)
    try:
        result: Chapter = mod.run(ctx)
    except Exception:  # a broken chapter is reported, and the tour goes on to the next
        return TopicReport(topic, title, "error", seconds=time.perf_counter() - start, error=traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    plots = [os.path.relpath(p, ctx.out) for p in result.plots]
    demo = {k: _json_number(v) for k, v in result.demo.items()}
    return TopicReport(topic, title, "ok", [asdict(c) for c in result.claims], demo,
                       list(result.lines), plots, time.perf_counter() - start)


def _json_number(x: float) -> float | str:
    """Demo values go to strict JSON: inf and nan become the strings "inf", "-inf", "nan"."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _fmt(x: float) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if x == 0 or math.isnan(x) or math.isinf(x):
        return str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.4g}"


def print_topic(console: Console, rep: TopicReport) -> None:
    head = f"[bold]{rep.id}. {rep.title}[/bold]"
    if rep.status == NOT_IMPLEMENTED:
        console.print(f"{head}  [dim]{NOT_IMPLEMENTED}[/dim]")
        return
    if rep.status == "error":
        console.print(Panel(rep.error or "", title=f"{rep.id}. {rep.title}: chapter failed", border_style="red"))
        return
    console.rule(f"{head}  [dim]({rep.seconds:.1f} s)[/dim]")
    if rep.claims:
        table = Table(show_lines=False, expand=True)
        for col, style in (("claim", None), ("notes", "cyan"), ("nanomm", "bold"), ("verdict", None), ("source", "dim")):
            table.add_column(col, style=style, overflow="fold")
        for c in rep.claims:
            table.add_row(c["claim"], c["notes"], c["nanomm"], f"[{VERDICT_STYLE[c['verdict']]}]{c['verdict']}[/]", c["source"])
        console.print(table)
    for line in rep.lines:
        console.print(line)
    if rep.demo:
        console.print("demo: " + ", ".join(f"{k} = [bold]{_fmt(v)}[/bold]" for k, v in rep.demo.items()))
    for p in rep.plots:
        console.print(f"[dim]plot: {p}[/dim]")


def _markdown(reports: list[TopicReport]) -> str:
    out = ["# nanomm tour report", "",
           "Each chapter recomputes the checkable figures of the notes with nanomm's own code. "
           "Verdicts: holds / approx / wrong / unverifiable.", ""]
    for rep in reports:
        out.append(f"## {rep.id}. {rep.title}")
        out.append("")
        if rep.status != "ok":
            out += [f"*{rep.status}*", ""]
            if rep.error:
                out += ["```", rep.error.strip(), "```", ""]
            continue
        if rep.claims:
            out += ["| claim | notes | nanomm | verdict | source |", "|---|---|---|---|---|"]
            for c in rep.claims:
                cells = [str(c[k]).replace("|", "\\|").replace("\n", " ") for k in ("claim", "notes", "nanomm", "verdict", "source")]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out += [*rep.lines, ""] if rep.lines else []
        if rep.demo:
            out += ["| demo | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rep.demo.items()] + [""]
        out += [f"![{Path(p).stem}]({p})" for p in rep.plots] + ([""] if rep.plots else [])
    return "\n".join(out)


def run_tour(topics: list[int] | None = None, *, quick: bool = False, out: Path | str = "tour-report",
             console: Console | None = None) -> list[TopicReport]:
    """Run the chapters ``topics`` (default: all 19, in order) and write report.md and report.json to ``out``."""
    topics = sorted(TOPICS) if not topics else list(topics)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise ValueError(f"topic: expected ids in 1..{len(TOPICS)}, got {unknown}")
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = TourContext(out=out, quick=quick)
    reports = []
    for t in topics:
        rep = run_chapter(t, ctx)
        print_topic(console, rep)
        reports.append(rep)
    payload = {"quick": quick, "topics": [asdict(r) for r in reports]}
    write_json(out / "report.json", payload)
    write_text(out / "report.md", _markdown(reports))
    done = sum(r.status == "ok" for r in reports)
    failed = [r.id for r in reports if r.status == "error"]
    verdicts = [c["verdict"] for r in reports for c in r.claims]
    console.rule("[bold]summary")
    console.print(f"{done}/{len(reports)} chapters ran, {len(verdicts)} claims checked: "
                  + ", ".join(f"{v} {verdicts.count(v)}" for v in VERDICT_STYLE) +
                  (f"; [red]failed chapters: {failed}[/red]" if failed else "") +
                  f"\nreport: {out / 'report.md'} and {out / 'report.json'}")
    return reports
