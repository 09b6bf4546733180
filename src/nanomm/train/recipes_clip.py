"""CLIP end to end on the images that ship: ``train_clip`` behind ``nanomm train clip``, ``zero_shot``
behind ``nanomm zero-shot``.

    dataset (shapes | digits) → caption tokenizer → ImageTextBatches → CLIP → Trainer(clip_objective)
    → a transformers CLIPModel folder (config.json, model.safetensors) + tokenizer.json, metrics.jsonl,
      loss.png, results.json (zero-shot accuracy with its chance level, retrieval recall@1/5)

Zero-shot accuracy is measured the way CLIP measures it: class names become prompts, the class whose
text embedding is nearest the image wins. On shapes the classes are the 24 colour–shape pairs and the
images come from the held-out pairs that training never showed together (chance 1/24); on digits the
classes are the ten digits and the images the test split (chance 1/10).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console

from nanomm.data.images import (COLOURS, DIGIT_PROMPTS, SHAPE_PROMPTS, SHAPES, DigitsDataset, ImageTextBatches,
                                ImageTextDataset, ShapesDataset, caption_tokenizer, fill_prompt, load_image)
from nanomm.data.tokenizer import TextTokenizer, load_tokenizer
from nanomm.io import write_json
from nanomm.models.clip import CLIP, clip_from_hf, clip_to_hf, retrieval_recall, zero_shot_probs, zero_shot_weights
from nanomm.models.vision_config import CLIPConfig, vision_preset
from nanomm.train.objectives_clip import clip_objective
from nanomm.train.trainer import TrainConfig, Trainer

__all__ = ["train_clip", "zero_shot", "load_clip", "evaluate_clip", "prompts_for", "CLIPRun", "DATASETS",
           "ZERO_SHOT_SPLITS", "RETRIEVAL_SPLIT"]


@dataclass
class CLIPRun:
    out_dir: Path
    metrics: dict[str, float]


# data name -> (split, image_size, seed, n) -> dataset; n is ignored by digits (it has 1,797 scans)
DATASETS: dict[str, Callable[[str, int, int, int], ImageTextDataset]] = {
    "shapes": lambda split, size, seed, n: ShapesDataset(split, n, size, seed),
    "digits": lambda split, size, seed, n: DigitsDataset(split, size, seed),
}
# data name -> zero-shot evaluations (metric prefix, split, label attribute), and the retrieval split
ZERO_SHOT_SPLITS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "shapes": (("zero_shot", "heldout", "object"), ("seen_zero_shot", "test", "object")),
    "digits": (("zero_shot", "test", "digit"),),
}
RETRIEVAL_SPLIT: dict[str, str] = {"shapes": "test", "digits": "test"}
PROMPTS: dict[str, tuple[str, ...]] = {"shapes": SHAPE_PROMPTS, "digits": DIGIT_PROMPTS}
CLASS_NAMES: dict[str, list[str]] = {"shapes": [f"{c} {s}" for c in COLOURS for s in SHAPES],
                                     "digits": [str(d) for d in range(10)]}


def prompts_for(dataset: ImageTextDataset) -> list[Callable[[str], str]]:
    return [lambda name, t=t: fill_prompt(t, name) for t in dataset.prompts]


def _zero_shot_accuracy(model: CLIP, tokenizer: TextTokenizer, ds: ImageTextDataset, attr: str, prefix: str,
                        batch_size: int) -> dict[str, float]:
    classes = ds.classes[attr]
    weights = zero_shot_weights(model, tokenizer, classes, prompts_for(ds))  # (C, P)
    probs = torch.cat([zero_shot_probs(model, ds.images(range(i, min(i + batch_size, len(ds)))), weights)
                       for i in range(0, len(ds), batch_size)])  # (N, C)
    pred, truth = probs.argmax(-1), ds.labels[attr]
    out = {f"{prefix}_accuracy": float((pred == truth).float().mean()), f"{prefix}_chance": 1.0 / len(classes),
           f"{prefix}_classes": float(len(classes)), f"{prefix}_images": float(len(ds))}
    if attr == "object":  # which half of the colour–shape pair the errors get wrong
        n_shapes = len(ds.classes["shape"])
        out[f"{prefix}_colour_accuracy"] = float((pred // n_shapes == truth // n_shapes).float().mean())
        out[f"{prefix}_shape_accuracy"] = float((pred % n_shapes == truth % n_shapes).float().mean())
    return out


@torch.no_grad()
def evaluate_clip(model: CLIP, tokenizer: TextTokenizer, data: str, *, seed: int = 0, n: int = 500,
                  image_size: int | None = None, batch_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy (with its chance level) and retrieval recall@1/5 on held-out images.

    shapes: "zero_shot_*" on the held-out colour–shape pairs, "seen_zero_shot_*" on new images of the
    pairs seen in training, both among all 24 pairs; digits: "zero_shot_*" on the test split."""
    if data not in DATASETS:
        raise ValueError(f"data: expected one of {sorted(DATASETS)}, got {data!r}")
    model.eval()
    size = image_size or model.config.vision.image_size
    out: dict[str, float] = {}
    for k, (prefix, split, attr) in enumerate(ZERO_SHOT_SPLITS[data]):
        out.update(_zero_shot_accuracy(model, tokenizer, DATASETS[data](split, size, seed + 1 + k, n), attr, prefix,
                                       batch_size))
    ret = DATASETS[data](RETRIEVAL_SPLIT[data], size, seed + 10, n)
    idx = list(range(min(len(ret), n)))
    img = torch.cat([model.encode_image(ret.images(idx[i:i + batch_size])) for i in range(0, len(idx), batch_size)])
    enc = tokenizer.encode_batch([ret.captions[i] for i in idx])
    txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    # identical captions are interchangeable: a hit is any item with the same caption
    caption_id = {c: k for k, c in enumerate(sorted(set(ret.captions)))}
    labels = torch.tensor([caption_id[ret.captions[i]] for i in idx])
    out.update(retrieval_recall(img, txt, (1, 5), image_labels=labels, text_labels=labels))
    out["retrieval_images"] = float(len(idx))
    return out


def train_clip(out_dir: str | os.PathLike, *, data: str = "shapes", steps: int = 800, preset: str = "clip-tiny",
               batch_size: int = 128, n_train: int = 4000, lr: float = 2e-3, seed: int = 0,
               precision: str = "fp32", resume: bool = False, eval_n: int = 500, console: Console | None = None,
               model_overrides: dict[str, Any] | None = None, **train_overrides: Any) -> CLIPRun:
    """Train a CLIP preset on ``data`` ("shapes" or "digits") into ``out_dir``; returns the final metrics.

    ``model_overrides`` change preset fields, e.g. {"vision": {"n_layer": 2}, "projection_dim": 32};
    ``train_overrides`` are TrainConfig fields (warmup_steps, weight_decay, ...).
    """
    if data not in DATASETS:
        raise ValueError(f"data: expected one of {sorted(DATASETS)}, got {data!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = caption_tokenizer()
    tok.save(out / "tokenizer.json")
    base = vision_preset(preset, **(model_overrides or {}))
    if not isinstance(base, CLIPConfig):
        raise ValueError(f"preset: expected a CLIP preset (clip-*), got the vision tower {preset!r}")
    config = base.replace(text={**base.text.to_dict(), "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                                "pad_token_id": tok.pad_id})
    size = config.vision.image_size
    train_set = DATASETS[data]("train", size, seed, n_train)
    torch.manual_seed(seed)
    model = CLIP(config)
    batches = ImageTextBatches(train_set, tok, min(batch_size, len(train_set)), seed=seed)
    cfg = TrainConfig(**{"steps": steps, "lr": lr, "min_lr": lr / 20, "warmup_steps": min(100, steps // 10),
                         "weight_decay": 0.1, "beta2": 0.98, "eval_every": 0, "save_every": max(1, steps // 2),
                         "log_every": max(1, steps // 50), "seed": seed, **train_overrides})
    trainer = Trainer(model, clip_objective, batches, cfg, out, precision=precision, console=console)
    start = time.perf_counter()
    history = trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    model = trainer.model.float()
    with torch.no_grad():  # a 16-bit run's fp32 masters are the weights to keep
        for name, master in trainer.mp.named_parameters():
            model.get_parameter(name).copy_(master)
    metrics = {**evaluate_clip(model, tok, data, seed=seed, n=eval_n), "steps": trainer.step, "seconds": seconds,
               "first_loss": history[0]["loss"] if history else float("nan"),
               "final_loss": history[-1]["loss"] if history else float("nan"),
               "parameters": float(sum(p.numel() for p in model.parameters()))}
    meta = {"data": data, "prompts": list(PROMPTS[data]), "classes": CLASS_NAMES[data], "preset": preset}
    clip_to_hf(model, out, extra={"nanomm": meta})
    write_json(out / "results.json", metrics)
    return CLIPRun(out, metrics)


def load_clip(model_dir: str | os.PathLike) -> tuple[CLIP, TextTokenizer, dict[str, Any]]:
    """A trained folder → (model in eval mode, its tokenizer, what train_clip recorded under "nanomm")."""
    folder = Path(model_dir)
    model = clip_from_hf(folder)
    tok = load_tokenizer(folder / "tokenizer.json")
    meta = json.loads((folder / "config.json").read_text()).get("nanomm", {})
    return model, tok, meta


def zero_shot(model_dir: str | os.PathLike, image_path: str | os.PathLike, labels: Sequence[str],
              templates: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """Classify one PNG/JPEG among ``labels`` with a CLIP folder; (label, probability), most likely first.

    The prompts are those recorded at training ("a photo of a {}" for shapes), else "a photo of a {}".
    """
    if isinstance(labels, str) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise ValueError(f"labels: expected a non-empty list of non-empty strings, got {labels!r}")
    model, tok, meta = load_clip(model_dir)
    chosen = list(templates or meta.get("prompts") or ["a photo of a {}"])
    pixels = load_image(image_path, model.config.vision.image_size)[None]  # (1, 3, H, W)
    weights = zero_shot_weights(model, tok, [x.strip() for x in labels],
                                [lambda name, t=t: fill_prompt(t, name) for t in chosen])
    probs = zero_shot_probs(model, pixels, weights)[0]
    return sorted(zip([x.strip() for x in labels], probs.tolist()), key=lambda p: -p[1])
