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
from safetensors.torch import load_model

from nanomm.data import (MLMBatches, encode_documents, load_corpus, load_tokenizer, make_nsp_pairs, sentence_ids,
                         train_tokenizer, train_val_split)
from nanomm.data.lm import LMBatches
from nanomm.io import write_json
from nanomm.models import build, preset, to_hf
from nanomm.train.objectives import IGNORE_INDEX, causal_lm, mlm_nsp, unigram_cross_entropy
from nanomm.train.distributed import Job
from nanomm.train.memory_report import checkpoint_blocks
from nanomm.train.trainer import TrainConfig, Trainer, evaluate


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


def _fp32_weights(trainer: Trainer) -> torch.nn.Module:
    """The trained model in fp32, holding the masters of a 16-bit run."""
    model = trainer.model.float()
    with torch.no_grad():
        for name, master in trainer.mp.named_parameters():
            model.get_parameter(name).copy_(master)
    return model


def _lm_data(out: Path, data: str, vocab_size: int, seed: int, resume: bool):
    corpus = load_corpus(data)
    tok = _tokenizer(out, corpus.documents, "bpe", vocab_size, resume)
    train_ids, val_ids = train_val_split(encode_documents(corpus.documents, tok), val_fraction=0.1, seed=seed)
    return tok, train_ids, val_ids


def lm_job(out_dir: str | Path, *, preset_name: str = "llama-tiny", data: str = "pydoc", steps: int = 600,
           batch_size: int = 16, block_size: int = 128, vocab_size: int = 4096, lr: float = 3e-3, seed: int = 0,
           resume: bool = True, **train_overrides: Any) -> Job:
    """Everything one process trains in ``train_lm``: built the same way in every process of a
    distributed run (the tokenizer is read from out_dir, where the launching process wrote it)."""
    out = Path(out_dir)
    tok, train_ids, val_ids = _lm_data(out, data, vocab_size, seed, resume)
    config = preset(preset_name)
    if config.family == "bert":
        raise ValueError(f"preset_name: expected a decoder preset (gpt*, llama*), got the encoder {preset_name!r}; "
                         f"use train_mlm for BERT")
    config = config.replace(vocab_size=tok.vocab_size, max_positions=max(config.max_positions, block_size))
    torch.manual_seed(seed)
    model = build(config)
    val = LMBatches(val_ids, block_size, batch_size, seed=seed, shuffle=False)
    cfg = TrainConfig(**{"steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": min(100, steps // 10),
                         "eval_every": max(1, steps // 10), "save_every": max(1, steps // 4), "seed": seed,
                         **train_overrides})
    full_batches = lambda: (b for b in val.epoch_batches() if len(b["input_ids"]) == batch_size)  # noqa: E731
    return Job(model, causal_lm, LMBatches(train_ids, block_size, batch_size, seed=seed), cfg, val_data=full_batches,
               tokens_per_batch=lambda b: b["input_ids"].numel())


def train_lm(out_dir: str | Path, *, preset_name: str = "llama-tiny", data: str = "pydoc", steps: int = 600,
             batch_size: int = 16, block_size: int = 128, vocab_size: int = 4096, precision: str = "fp32",
             lr: float = 3e-3, seed: int = 0, resume: bool = False, distributed: str | None = None, nproc: int = 1,
             ds_config: str | Path | None = None, activation_checkpointing: bool = False,
             console: Console | None = None, **train_overrides: Any) -> RunResult:
    """Pretrain a decoder (GPT or LLaMA preset) on next-token prediction; returns the final metrics.

    ``distributed`` (ddp | zero1 | zero2 | zero3 | deepspeed) trains on ``nproc`` processes through
    nanomm.train.distributed.launch; the sharded checkpoint is consolidated and exported the same way.
    ``activation_checkpointing`` recomputes each block in backward instead of keeping its activations.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_ids, val_ids = _lm_data(out, data, vocab_size, seed, resume)  # writes tokenizer.json first
    kwargs = dict(preset_name=preset_name, data=data, steps=steps, batch_size=batch_size, block_size=block_size,
                  vocab_size=vocab_size, lr=lr, seed=seed, **train_overrides)
    job = lm_job(out, **kwargs)
    start = time.perf_counter()
    if distributed is None:
        if activation_checkpointing:
            checkpoint_blocks(job.model)
        trainer = Trainer(job.model, job.objective, job.train_data, job.cfg, out, val_data=job.val_data,
                          tokens_per_batch=job.tokens_per_batch, precision=precision, console=console)
        trainer.fit(resume=resume)
        model = _fp32_weights(trainer)
    else:
        from nanomm.train.distributed import launch

        if resume:
            raise ValueError("resume: a distributed run cannot resume yet; start a new --out, or train on one process")
        launch("nanomm.train.recipes:lm_job", out, distributed=distributed, nproc=nproc,
               build_kwargs={"out_dir": str(out), **kwargs},
               precision=precision, ds_config=ds_config, seed=seed, progress=console is not None,
               activation_checkpointing=activation_checkpointing)
        model = job.model.float()
        load_model(model, str(out / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"))
    seconds = time.perf_counter() - start
    final = evaluate(model, causal_lm, job.val_data(), job.cfg.eval_batches)
    unigram = unigram_cross_entropy(torch.as_tensor(train_ids), torch.as_tensor(val_ids), tok.vocab_size)
    metrics = {"val_loss": final["val_loss"], "unigram_val_loss": unigram, "val_accuracy": final["val_accuracy"],
               "steps": steps, "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
               "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
               "distributed": distributed or "none", "processes": nproc if distributed else 1}
    to_hf(model, out)
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
    model = _fp32_weights(trainer)
    final = evaluate(model, mlm_nsp, iter(val_fixed), len(val_fixed))
    metrics = {"val_mlm_accuracy": final["val_mlm_accuracy"], "val_nsp_accuracy": final["val_nsp_accuracy"],
               "val_loss": final["val_loss"], "steps": trainer.step, "seconds": seconds,
               **mlm_baselines(batches, val_fixed), "parameters": sum(p.numel() for p in model.parameters())}
    to_hf(model, out)
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
