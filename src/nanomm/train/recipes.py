"""End-to-end pretraining runs behind ``nanomm train lm`` and ``nanomm train mlm``.

Each recipe goes corpus → tokenizer → batches → model → Trainer → a folder that is a Hugging Face
model directory (config.json, model.safetensors, tokenizer.json) plus metrics.jsonl, loss.png,
results.json and checkpoints/ for ``resume``. ``from_hf(DIR)`` and transformers both load the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nanomm.data import (MLMBatches, encode_documents, load_corpus, load_tokenizer, make_nsp_pairs, sentence_ids,
                         train_tokenizer, train_val_split)
from nanomm.data.lm import LMBatches
from nanomm.io import write_json
from nanomm.models import build, preset, to_hf
from nanomm.train.objectives import IGNORE_INDEX, causal_lm, mlm_nsp, unigram_cross_entropy
from nanomm.train.trainer import TrainConfig, Trainer


@dataclass
class RunResult:
    out_dir: Path
    metrics: dict[str, float]


def _tokenizer(out: Path, documents: list[str], kind: str, vocab_size: int, resume: bool):
    path = out / "tokenizer.json"
    if resume and path.exists():  # the checkpoint's embeddings were trained against this exact vocabulary
        return load_tokenizer(path)
    tok = train_tokenizer(documents, kind, vocab_size=vocab_size)
    tok.save(path)
    return tok


def _export(trainer: Trainer, out: Path) -> None:
    """Write the trained weights as a Hugging Face folder, in fp32 (the masters of a 16-bit run)."""
    model = trainer.model.float()
    with torch.no_grad():
        for name, master in trainer.mp.named_parameters():
            model.get_parameter(name).copy_(master)
    to_hf(model, out)


def train_lm(out_dir: str | Path, *, preset_name: str = "llama-tiny", data: str = "pydoc", steps: int = 600,
             batch_size: int = 16, block_size: int = 128, vocab_size: int = 4096, precision: str = "fp32",
             lr: float = 3e-3, seed: int = 0, resume: bool = False, console: Console | None = None,
             **train_overrides: Any) -> RunResult:
    """Pretrain a decoder (GPT or LLaMA preset) on next-token prediction; returns the final metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(data)
    tok = _tokenizer(out, corpus.documents, "bpe", vocab_size, resume)
    train_ids, val_ids = train_val_split(encode_documents(corpus.documents, tok), val_fraction=0.1, seed=seed)
    config = preset(preset_name)
    if config.family == "bert":
        raise ValueError(f"preset_name: expected a decoder preset (gpt*, llama*), got the encoder {preset_name!r}; "
                         f"use train_mlm for BERT")
    config = config.replace(vocab_size=tok.vocab_size, max_positions=max(config.max_positions, block_size))
    torch.manual_seed(seed)
    model = build(config)
    batches = LMBatches(train_ids, block_size, batch_size, seed=seed)
    val = LMBatches(val_ids, block_size, batch_size, seed=seed, shuffle=False)
    cfg = TrainConfig(**{"steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": min(100, steps // 10),
                         "eval_every": max(1, steps // 10), "save_every": max(1, steps // 4), "seed": seed,
                         **train_overrides})
    trainer = Trainer(model, causal_lm, batches, cfg, out, val_data=val.epoch_batches,
                      tokens_per_batch=lambda b: b["input_ids"].numel(), precision=precision, console=console)
    start = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    final = trainer.evaluate()
    unigram = unigram_cross_entropy(torch.as_tensor(train_ids), torch.as_tensor(val_ids), tok.vocab_size)
    metrics = {"val_loss": final["val_loss"], "unigram_val_loss": unigram, "val_accuracy": final["val_accuracy"],
               "steps": trainer.step, "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
               "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))}
    _export(trainer, out)
    write_json(out / "results.json", metrics)
    return RunResult(out, metrics)


def train_mlm(out_dir: str | Path, *, preset_name: str = "bert-tiny", data: str = "pydoc", steps: int = 600,
              batch_size: int = 32, max_seq_length: int = 128, vocab_size: int = 4096, precision: str = "fp32",
              lr: float = 1e-3, seed: int = 0, resume: bool = False, console: Console | None = None,
              **train_overrides: Any) -> RunResult:
    """Pretrain BERT on masked-LM + next-sentence prediction; returns the final metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(data)
    tok = _tokenizer(out, corpus.documents, "wordpiece", vocab_size, resume)
    docs = sentence_ids(corpus.documents, tok)
    n_val = max(2, len(docs) // 10)  # whole documents held out, so no sentence is in both splits
    pairs = {split: make_nsp_pairs(d, cls_id=tok.cls_id, sep_id=tok.sep_id, max_seq_length=max_seq_length, seed=seed)
             for split, d in (("train", docs[n_val:]), ("val", docs[:n_val]))}
    config = preset(preset_name)
    if config.family != "bert":
        raise ValueError(f"preset_name: expected a BERT preset (bert-*), got {preset_name!r}; use train_lm for decoders")
    config = config.replace(vocab_size=tok.vocab_size, max_positions=max(config.max_positions, max_seq_length),
                            task="pretraining")
    torch.manual_seed(seed)
    model = build(config)
    batches = MLMBatches(pairs["train"], tok, batch_size, seed=seed)
    val = MLMBatches(pairs["val"], tok, batch_size, seed=seed + 1, shuffle=False)
    val_fixed = [val.batch(range(i, min(i + batch_size, len(pairs["val"]))), seed=i)  # one fixed masking
                 for i in range(0, len(pairs["val"]), batch_size)]
    cfg = TrainConfig(**{"steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": min(100, steps // 10),
                         "eval_every": max(1, steps // 10), "save_every": max(1, steps // 4), "seed": seed,
                         "eval_batches": len(val_fixed), **train_overrides})
    trainer = Trainer(model, mlm_nsp, batches, cfg, out, val_data=lambda: iter(val_fixed),
                      tokens_per_batch=lambda b: int(b["attention_mask"].sum()), precision=precision, console=console)
    start = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    final = trainer.evaluate()
    metrics = {"val_mlm_accuracy": final["val_mlm_accuracy"], "val_nsp_accuracy": final["val_nsp_accuracy"],
               "val_loss": final["val_loss"], "steps": trainer.step, "seconds": seconds,
               **mlm_baselines(batches, val_fixed), "parameters": sum(p.numel() for p in model.parameters())}
    _export(trainer, out)
    write_json(out / "results.json", metrics)
    return RunResult(out, metrics)


def mlm_baselines(train: MLMBatches, val_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """What a model ignoring context scores: always the most frequent masked-out training token
    (MLM), always the majority class (NSP)."""
    counts = torch.zeros(train.tokenizer.vocab_size)
    for i in range(0, len(train.pairs), 256):
        labels = train.batch(range(i, min(i + 256, len(train.pairs))), seed=i)["labels"]
        counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=len(counts))
    top = int(counts.argmax())
    labels = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in val_batches])
    nsp = torch.cat([b["next_sentence_label"] for b in val_batches]).float()
    return {"mlm_frequency_baseline": float((labels == top).float().mean()),
            "nsp_majority_baseline": float(max(nsp.mean(), 1 - nsp.mean()))}
