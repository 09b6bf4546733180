"""The ``nanomm`` command: the tour of the notes, benchmarks against the reference libraries, and tools."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="nanomm: the multimodal/NLP canon from first principles, checked against the references.")
console = Console()

# name -> (module under nanomm.bench, what it measures). Each module has run(quick, out_dir) -> dict.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "attention": ("nanomm.bench.attention", "naive vs flash vs sdpa attention: time and peak memory, T = 512 … 8192"),
    "train": ("nanomm.bench.train", "training tokens/s of nanomm's LLaMA vs transformers'; peak memory fp32 vs bf16"),
    "generate": ("nanomm.bench.generate", "decoding with and without KV cache; nanomm vs transformers generate"),
    "bm25": ("nanomm.bench.bm25", "nanomm's BM25 vs bm25s and rank_bm25: index time and queries/s"),
}


@app.command()
def tour(
    topic: Optional[List[int]] = typer.Option(None, "--topic", "-t", help="Topic id 1..19 (repeat for several); default all."),
    quick: bool = typer.Option(False, "--quick", help="Smaller demos: the whole tour in about a minute."),
    out: Path = typer.Option(Path("tour-report"), "--out", help="Folder for report.md, report.json and plots."),
) -> None:
    """Walk the 19 topics of the notes: check every figure with nanomm's code, run a live demo per topic."""
    from nanomm.tour import run_tour

    try:
        reports = run_tour(topic, quick=quick, out=out, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--topic") from None
    if any(r.status == "error" for r in reports):
        raise typer.Exit(1)


@app.command()
def bench(
    name: str = typer.Argument(..., help="Which benchmark: " + ", ".join(BENCHMARKS) + "."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (for scripts)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes, for a first look."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for plots and the JSON results."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch threads during the run (1 is steadier on a busy machine)."),
) -> None:
    """Measure nanomm against its reference in one run: ratios, not absolute claims."""
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"expected one of {', '.join(BENCHMARKS)}, got {name!r}", param_hint="NAME")
    module = importlib.import_module(BENCHMARKS[name][0])
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        result = module.run(quick=quick, out_dir=out, console=None if as_json else console)
    finally:
        torch.set_num_threads(before)
    if as_json:
        typer.echo(json.dumps(result, indent=2))


from nanomm.rag.cli import rag_app  # noqa: E402 - the sub-app is defined in its own package

app.add_typer(rag_app, name="rag", help="Retrieval-augmented answers: index, search, ask, eval.")

train_app = typer.Typer(no_args_is_help=True, help="Train a model end to end; the output folder loads with from_hf.")
app.add_typer(train_app, name="train")

PRECISION_HELP = "fp32 | bf16 | fp16 (fp32 master weights; fp16 adds dynamic loss scaling)"


def _run_recipe(fn, out: Path, **kwargs) -> None:
    try:
        result = fn(out, console=console, **kwargs)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print_json(data=result.metrics)
    console.print(f"model, tokenizer, metrics.jsonl and loss.png in {result.out_dir}")


@train_app.command("lm")
def train_lm_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (a Hugging Face model directory when done)."),
    preset_name: str = typer.Option("llama-tiny", "--preset", help="A decoder preset: llama-tiny, gpt-tiny, gpt2, ..."),
    data: str = typer.Option("pydoc", "--data", help="Corpus: pydoc | docs | shakespeare | a file or folder of text."),
    steps: int = typer.Option(600, "--steps", min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    block_size: int = typer.Option(128, "--block-size", min=2, help="Tokens per training sequence."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (warm-up then cosine)."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
    distributed: Optional[str] = typer.Option(None, "--distributed",
                                              help="ddp | zero1 | zero2 | zero3 | deepspeed: train on --nproc processes."),
    nproc: int = typer.Option(2, "--nproc", min=1, help="Processes for --distributed (gloo on CPU, nccl on GPU)."),
    ds_config: Optional[Path] = typer.Option(None, "--ds-config", help="DeepSpeed JSON config (with --distributed deepspeed)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing",
                                                  help="Recompute each block in backward: less memory, ~1/3 more compute."),
) -> None:
    """Pretrain a GPT or LLaMA on next-token prediction, on one process or several."""
    from nanomm.train.recipes import train_lm

    _run_recipe(train_lm, out, preset_name=preset_name, data=data, steps=steps, batch_size=batch_size,
                block_size=block_size, lr=lr, precision=precision, seed=seed, resume=resume,
                distributed=distributed, nproc=nproc if distributed else 1, ds_config=ds_config,
                activation_checkpointing=activation_checkpointing)


@train_app.command("mlm")
def train_mlm_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (a Hugging Face model directory when done)."),
    preset_name: str = typer.Option("bert-tiny", "--preset", help="A BERT preset: bert-tiny, bert-base, ..."),
    data: str = typer.Option("pydoc", "--data", help="Corpus: pydoc | docs | shakespeare | a file or folder of text."),
    steps: int = typer.Option(600, "--steps", min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    max_seq_length: int = typer.Option(128, "--max-seq-length", min=5, help="[CLS] A [SEP] B [SEP] length."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (warm-up then cosine)."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
) -> None:
    """Pretrain BERT on masked-LM + next-sentence prediction."""
    from nanomm.train.recipes import train_mlm

    _run_recipe(train_mlm, out, preset_name=preset_name, data=data, steps=steps, batch_size=batch_size,
                max_seq_length=max_seq_length, lr=lr, precision=precision, seed=seed, resume=resume)


@train_app.command("clip")
def train_clip_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (loads with transformers' CLIPModel too)."),
    data: str = typer.Option("shapes", "--data", help="shapes (procedural, held-out colour-shape pairs) | digits."),
    preset_name: str = typer.Option("clip-tiny", "--preset", help="A CLIP preset: clip-tiny, clip-vit-b-32, ..."),
    steps: int = typer.Option(800, "--steps", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=2, help="Image-text pairs per step (the negatives)."),
    lr: float = typer.Option(2e-3, "--lr"),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
) -> None:
    """Train CLIP with the symmetric InfoNCE loss on images that ship; reports zero-shot accuracy vs chance."""
    from nanomm.train.recipes_clip import train_clip

    _run_recipe(train_clip, out, data=data, preset=preset_name, steps=steps, batch_size=batch_size, lr=lr,
                precision=precision, seed=seed, resume=resume)


@train_app.command("sft")
def train_sft_cmd(
    base: Path = typer.Option(..., "--base", help="The base model folder (from `nanomm train lm`)."),
    out: Path = typer.Option(..., "--out", help="Output folder: merged HF model, adapter/ (PEFT), results.json."),
    peft: str = typer.Option("lora", "--peft", help="lora | prefix | adapter | ia3 | none (full fine-tune)."),
    steps: int = typer.Option(300, "--steps", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the method's)."),
    rejected_fraction: float = typer.Option(0.0, "--rejected-fraction",
                                            help="Share of demonstrations answered the rejected way (a DPO start point)."),
    pack: bool = typer.Option(False, "--pack", help="Pack several examples per row (attention kept within each)."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
) -> None:
    """Supervised fine-tuning on the instruction set: loss on response tokens only, full or parameter-efficient."""
    from nanomm.train.recipes_finetune import train_sft

    _run_recipe(train_sft, out, base_dir=base, peft=peft, steps=steps, batch_size=batch_size, lr=lr,
                rejected_fraction=rejected_fraction, pack=pack, precision=precision, seed=seed, resume=resume)


@train_app.command("dpo")
def train_dpo_cmd(
    base: Path = typer.Option(..., "--base", help="The SFT model folder (from `nanomm train sft`); also the reference."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    beta: float = typer.Option(0.1, "--beta", help="β, the KL-penalty coefficient (not a temperature)."),
    loss: str = typer.Option("sigmoid", "--loss", help="sigmoid (the paper) | ipo | hinge | robust | cdpo."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="ε, assumed rate of flipped labels."),
    peft: str = typer.Option("lora", "--peft", help="lora (reference = adapters off, no copy) | none (frozen copy)."),
    steps: int = typer.Option(200, "--steps", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the method's)."),
    precompute_reference: bool = typer.Option(True, "--precompute-reference/--live-reference",
                                              help="Reference log-probs computed once and cached on disk."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
) -> None:
    """Direct preference optimisation from an SFT model; held-out reward accuracy and answer-kind rates."""
    from nanomm.train.recipes_finetune import train_dpo

    _run_recipe(train_dpo, out, sft_dir=base, beta=beta, loss=loss, label_smoothing=label_smoothing, peft=peft,
                steps=steps, batch_size=batch_size, lr=lr, precompute_reference=precompute_reference, seed=seed,
                resume=resume)


def _vlm_options(stage1_steps: int, stage2_steps: int, seed: int):
    from nanomm.train.recipes_vlm import VlmOptions

    return VlmOptions(stage1_steps=stage1_steps, stage2_steps=stage2_steps, seed=seed)


def _print_vlm(metrics: dict, out: Path) -> None:
    console.print_json(data=metrics)
    console.print(f"model and results.json in {out}")


@train_app.command("blip2")
def train_blip2_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    vision: Optional[Path] = typer.Option(None, "--vision", help="A `nanomm train clip` folder for the frozen tower "
                                                                  "(default: train one first)."),
    stage1_steps: int = typer.Option(400, "--stage1-steps", min=1, help="Representation stage: ITC + ITM + ITG."),
    stage2_steps: int = typer.Option(1500, "--stage2-steps", min=1, help="Generative stage: Q-Former → frozen LM."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train BLIP-2's two stages on the shapes: frozen ViT, Q-Former, projection, frozen LM; captions scored."""
    from nanomm.train.recipes_vlm import train_blip2

    _print_vlm(train_blip2(out, options=_vlm_options(stage1_steps, stage2_steps, seed), vision_dir=vision,
                           console=console), out)


@train_app.command("llava")
def train_llava_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    vision: Optional[Path] = typer.Option(None, "--vision", help="A `nanomm train clip` folder for the tower "
                                                                  "(default: train one first)."),
    projector: str = typer.Option("mlp2x_gelu", "--projector", help="linear (LLaVA-1) | mlp2x_gelu (LLaVA-1.5)."),
    lora: bool = typer.Option(False, "--lora", help="Stage 2 trains LoRA on the LLM instead of all its weights."),
    stage1_steps: int = typer.Option(400, "--stage1-steps", min=1, help="Projector only, on captions."),
    stage2_steps: int = typer.Option(1500, "--stage2-steps", min=1, help="Projector + LLM, on questions."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train LLaVA's two stages on the shapes; question-answer accuracy scored against chance."""
    from nanomm.train.recipes_vlm import train_llava

    try:
        metrics = train_llava(out, options=_vlm_options(stage1_steps, stage2_steps, seed), projector=projector,
                              lora=lora, vision_dir=vision, console=console)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _print_vlm(metrics, out)


@app.command()
def ask(
    question: str = typer.Argument("", help="The question (LLaVA); a BLIP-2 folder captions the image instead."),
    model: Path = typer.Option(..., "--model", help="A `nanomm train llava` or `nanomm train blip2` folder."),
    image: Path = typer.Option(..., "--image", help="A PNG or JPEG file."),
) -> None:
    """Ask a trained vision-language model about an image."""
    from nanomm.train.recipes_vlm import ask as ask_vlm

    try:
        typer.echo(ask_vlm(model, image, question))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None


@app.command("zero-shot")
def zero_shot_cmd(
    model: Path = typer.Option(..., "--model", help="A CLIP folder (nanomm train clip, or a Hugging Face CLIP)."),
    image: Path = typer.Option(..., "--image", help="A PNG or JPEG file."),
    labels: str = typer.Option(..., "--labels", help="Comma-separated class names, e.g. 'red circle,blue square'."),
) -> None:
    """Classify an image among labels it was never trained on, by text-image similarity."""
    from rich.table import Table

    from nanomm.train.recipes_clip import zero_shot

    try:
        ranked = zero_shot(model, image, [x.strip() for x in labels.split(",")])
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    table = Table("label", "probability")
    for label, p in ranked:
        table.add_row(label, f"{p:.3f}")
    console.print(table)


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", help="A nanomm or Hugging Face folder: config.json, weights, tokenizer.json."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample at this temperature (0 = greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample within the smallest set of mass p."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sampler, for a repeatable sample."),
) -> None:
    """Continue a prompt with a decoder (GPT-1/2, LLaMA), streaming tokens; greedy unless sampling is asked."""
    from nanomm.models.cli_generate import generate_cli

    try:
        generate_cli(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, stream=lambda s: typer.echo(s, nl=False))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo()


@app.command()
def memory(
    preset_name: str = typer.Option("llama-7b", "--preset", help="Model preset whose parameters are counted."),
    stage: int = typer.Option(2, "--stage", help="ZeRO stage: 0 (plain data parallel), 1, 2 or 3."),
    gpus: int = typer.Option(8, "--gpus", min=1, help="Data-parallel degree N_d."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", min=1, help="Train LoRA of this rank on q and v instead of all weights."),
    precision: str = typer.Option("mixed", "--precision", help="mixed (2+2+12 B/param) | fp32 (4+4+8 B/param)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length for the activation estimate."),
    micro_batch: int = typer.Option(1, "--micro-batch", min=1),
) -> None:
    """Bytes per device for weights, gradients, optimizer states and activations (the ZeRO paper's model)."""
    from nanomm.train.memory_report import print_memory_table

    try:
        print_memory_table(preset_name, stage, gpus, lora_r=lora_r, precision=precision, seq_len=seq_len,
                           micro_batch=micro_batch)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def params(
    presets: Optional[List[str]] = typer.Argument(None, help="Preset names (default: all), e.g. bert-base gpt2 llama-7b."),
) -> None:
    """Parameter counts of the model presets, itemised, beside the notes' figures."""
    from nanomm.models import print_params_table

    try:
        print_params_table(list(presets or []))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="PRESETS") from None


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
