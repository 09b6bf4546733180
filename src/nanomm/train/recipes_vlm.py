"""BLIP-2 and LLaVA trained end to end on the shapes that nanomm draws, in CPU minutes; ``ask`` uses them.

    train_blip2(out)   vision tower → LM → stage 1 (ITC + ITM + ITG) → stage 2 (captions through the frozen LM)
    train_llava(out)   vision tower → LM → stage 1 (projector only, captions) → stage 2 (projector + LLM,
                       or LoRA, on question–answer pairs)
    ask(out, image, question)   a LLaVA answers; a BLIP-2 captions (it never saw a question)

Both papers start from a pretrained, frozen image encoder and a pretrained LLM, so the recipe first
makes those: a CLIP ViT trained on the same images (or loaded from ``vision_dir``, a ``nanomm train
clip`` folder) and the decoder trained as a plain language model on the captions (and, for LLaVA, the
question–answer texts), without images. The tower is frozen, so its hidden states are computed once
per image and the stages read them (``vision_states``) instead of re-running the ViT every step.

Each run is the shared Trainer in ``out/<part>`` (metrics.jsonl, loss.png, a checkpoint); the model
is ``out/model.safetensors`` + ``config.json`` + ``tokenizer.json``; ``out/results.json`` holds the
accuracies on unseen images of the training colour–shape pairs ("test") and of held-out pairs
("heldout"), beside the chance level of uniform guessing. Text: the captions' word-level vocabulary
(nanomm.data.images) plus <image> and [DEC]; <s> opens every text (the Q-Former's [CLS], the LM's bos).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from nanomm.data.images import (COLOURS, POSITIONS, SHAPES, SIZES, ImageTextBatches, ShapesDataset,
                                caption_tokenizer, load_image)
from nanomm.data.lm import Batcher, Batches
from nanomm.data.tokenizer import TextTokenizer, load_tokenizer
from nanomm.io import atomic_path, write_json
from nanomm.models.blip2 import Blip2
from nanomm.models.blip2 import set_stage as blip2_stage
from nanomm.models.llava import Llava
from nanomm.models.llava import set_stage as llava_stage
from nanomm.models.multimodal_config import Blip2Config, LlavaConfig, multimodal_preset
from nanomm.models.vision_config import ViTConfig
from nanomm.train.objectives import IGNORE_INDEX, causal_lm
from nanomm.train.objectives_blip2 import stage1, stage2
from nanomm.train.objectives_llava import llava_lm
from nanomm.train.trainer import TrainConfig, Trainer

__all__ = ["VlmOptions", "vlm_tokenizer", "train_blip2", "train_llava", "ask", "load_vlm", "QABatches",
           "TextBatches", "lm_texts", "caption_attributes", "evaluate_captions", "evaluate_qa", "answer", "CHANCE",
           "QA_KINDS", "IMAGE_TOKEN", "DEC_TOKEN"]

IMAGE_TOKEN, DEC_TOKEN = "<image>", "[DEC]"
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "size": SIZES}
# uniform guessing: one attribute at a time, and all four of a caption at once
CHANCE = {k: 1 / len(v) for k, v in ATTRIBUTES.items()}
CHANCE["caption"] = float(np.prod(list(CHANCE.values())))
# the questions nanomm.data.images.shape_qa asks, in its order, and how many answers each kind has
QA_KINDS = {"colour": len(COLOURS), "shape": len(SHAPES), "position": len(POSITIONS), "size": len(SIZES),
            "yes": 2, "no": 2}


@dataclass
class VlmOptions:
    """Sizes and schedule of a run (the defaults take a few minutes on two CPU cores)."""

    n_train: int = 2000
    n_test: int = 200
    batch_size: int = 32
    vision_steps: int = 400  # CLIP pre-training of the tower (nanomm train clip), when no vision_dir is given
    vision_batch_size: int = 64
    lm_steps: int = 300  # text-only pre-training of the decoder
    stage1_steps: int = 400
    stage2_steps: int = 1500
    lr: float = 2e-3
    seed: int = 0


def vlm_tokenizer() -> TextTokenizer:
    """The captions' word-level tokenizer plus <image> (LLaVA's placeholder) and [DEC] (BLIP-2's ITG start)."""
    tok = caption_tokenizer()
    tok.backend.add_special_tokens([IMAGE_TOKEN, DEC_TOKEN])
    return TextTokenizer(tok.backend)


# ----------------------------------------------------------------------------- batches

class QABatches(Batches):
    """LLaVA batches: [<s>, <image>, question…] then [answer…, </s>], labels on the answer only. mode
    "caption": no question, the caption answers (stage 1); "qa": one of the image's question–answer
    pairs, drawn with the batch's seed (stage 2). ``states`` (N, …): the frozen tower's precomputed
    hidden states, given out as ``vision_states`` instead of the pixels."""

    def __init__(self, dataset: ShapesDataset, tokenizer: TextTokenizer, batch_size: int, mode: str, seed: int = 0,
                 states: torch.Tensor | None = None):
        if mode not in ("caption", "qa"):
            raise ValueError(f"mode: expected 'caption' or 'qa', got {mode!r}")
        self.batcher = Batcher(len(dataset), batch_size, seed=seed)
        self.dataset, self.tok, self.mode, self.states = dataset, tokenizer, mode, states

    def batch(self, idx: Sequence[int], seed: int | None = None) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        pairs = []
        for i in idx:
            qa = [("", self.dataset.captions[int(i)])] if self.mode == "caption" else self.dataset.qa(int(i))
            pairs.append(qa[rng.integers(len(qa))])
        image = ({"pixel_values": self.dataset.images(idx)} if self.states is None
                 else {"vision_states": self.states[idx]})
        return {**image, **encode_qa(self.tok, [q for q, _ in pairs], [a for _, a in pairs])}


class _WithStates:
    """ImageTextBatches with the pixels swapped for the frozen tower's precomputed states."""

    def __init__(self, batches: ImageTextBatches, states: torch.Tensor):
        self.batches, self.states = batches, states

    def __next__(self) -> dict[str, torch.Tensor]:
        b = next(self.batches)
        b.pop("pixel_values")
        return {**b, "vision_states": self.states[b["index"]]}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


class TextBatches(Batches):
    """Causal-LM batches of texts (no images): "<s> text </s>", targets shifted left, padding ignored."""

    def __init__(self, texts: list[str], tokenizer: TextTokenizer, batch_size: int, seed: int = 0):
        self.batcher = Batcher(len(texts), batch_size, seed=seed)
        self.texts, self.tok = texts, tokenizer

    def batch(self, indices: Sequence[int], seed: int | None = None) -> dict[str, torch.Tensor]:
        enc = self.tok.encode_batch([self.texts[int(i)] for i in indices])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        targets = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX),
                             torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def prompt_ids(tok: TextTokenizer, question: str) -> list[int]:
    q = tok.encode(question, add_special_tokens=False) if question else []
    return [tok.bos_id, tok.token_to_id(IMAGE_TOKEN), *q]


def encode_qa(tok: TextTokenizer, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on prompt and padding)."""
    rows = [(prompt_ids(tok, q), tok.encode(a, add_special_tokens=False) + [tok.eos_id])
            for q, a in zip(questions, answers)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    labels, mask = torch.full_like(ids, IGNORE_INDEX), torch.zeros_like(ids)
    for r, (p, a) in enumerate(rows):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
        mask[r, :len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def tower_states(model: Blip2 | Llava, dataset: ShapesDataset, batch_size: int = 100) -> torch.Tensor:
    """The frozen tower's hidden states of every image of ``dataset``, (N, tokens, d_v)."""
    return torch.cat([model.vision_states(dataset.images(np.arange(s, min(s + batch_size, len(dataset)))))
                      for s in range(0, len(dataset), batch_size)])


# ----------------------------------------------------------------------------- evaluation

def caption_attributes(text: str) -> dict[str, str | None]:
    """The colour, shape, size and position a caption names (None where it names none)."""
    words = f" {text.lower().strip()} "
    found = {attr: next((n for n in ATTRIBUTES[attr] if f" {n} " in words), None)
             for attr in ("colour", "shape", "size")}
    # the longest phrase first: "at the top left" also contains "at the top"
    phrases = sorted(((p[2], name) for name, p in POSITIONS.items()), key=lambda x: -len(x[0]))
    found["position"] = next((name for phrase, name in phrases if f" {phrase} " in words), None)
    return found


@torch.no_grad()
def evaluate_captions(model: Blip2, tok: TextTokenizer, dataset: ShapesDataset, states: torch.Tensor | None = None,
                      batch_size: int = 50) -> dict[str, float]:
    """Greedy captions of every image: the fraction naming each attribute right, and all four at once."""
    states = tower_states(model, dataset) if states is None else states
    hits = dict.fromkeys((*ATTRIBUTES, "caption"), 0)
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        new = model.caption(None, tok.bos_id, tok.eos_id, max_new_tokens=12, vision_states=states[idx])
        for i, row in zip(idx, new):
            got = caption_attributes(tok.decode(row))
            ok = [got[k] == truth for k, truth in zip(ATTRIBUTES, dataset.scenes[i][:4])]
            for k, v in zip(ATTRIBUTES, ok):
                hits[k] += v
            hits["caption"] += all(ok)
    return {k: v / len(dataset) for k, v in hits.items()}


@torch.no_grad()
def answer(model: Llava, tok: TextTokenizer, pixel_values: torch.Tensor | None, questions: list[str],
           max_new_tokens: int = 4, vision_states: torch.Tensor | None = None) -> list[str]:
    """Greedy answers to one question per image (prompts left-padded, as generate wants)."""
    from nanomm.models.generation import generate

    prompts = [prompt_ids(tok, q) for q in questions]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    s = model.splice(ids, pixel_values, mask, vision_states=vision_states)
    out = generate(model, inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                   max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id)
    return [tok.decode(row).strip() for row in out.new_tokens]


@torch.no_grad()
def evaluate_qa(model: Llava, tok: TextTokenizer, dataset: ShapesDataset, states: torch.Tensor | None = None,
                batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy over every question of every image, per question kind and overall, with the
    overall chance level (the mean over kinds of 1 / the kind's number of answers)."""
    states = tower_states(model, dataset) if states is None else states
    hits = dict.fromkeys(QA_KINDS, 0)
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        for k, kind in enumerate(QA_KINDS):
            qa = [dataset.qa(i)[k] for i in idx]
            got = answer(model, tok, None, [q for q, _ in qa], vision_states=states[idx])
            hits[kind] += sum(g == a for g, (_, a) in zip(got, qa))
    out = {f"qa_{k}": v / len(dataset) for k, v in hits.items()}
    out["qa_accuracy"] = sum(hits.values()) / (len(dataset) * len(QA_KINDS))
    out["qa_chance"] = float(np.mean([1 / n for n in QA_KINDS.values()]))
    return out


# ----------------------------------------------------------------------------- the pretrained parts

def vision_tower(opts: VlmOptions, out: Path, vision_dir: str | os.PathLike | None = None,
                 console=None) -> tuple[ViTConfig, dict[str, torch.Tensor]]:  # noqa: ANN001
    """The frozen tower's config and weights: a trained CLIP's vision half, from ``vision_dir`` (a ``nanomm
    train clip`` folder) or from a short ``train_clip`` run on the same shapes into ``out/vision``."""
    from nanomm.train.recipes_clip import load_clip, train_clip

    if vision_dir is None:
        vision_dir = out / "vision"
        train_clip(vision_dir, data="shapes", steps=opts.vision_steps, batch_size=opts.vision_batch_size,
                   n_train=opts.n_train, seed=opts.seed, eval_n=opts.n_test, console=console)
    clip, _, _ = load_clip(vision_dir)
    return clip.config.vision, clip.vision.state_dict()


def lm_texts(dataset: ShapesDataset, *, qa: bool = False, seed: int = 0) -> list[str]:
    """What the decoder reads before it meets an image. Every caption alone, and every caption after
    another wording of the same scene: text in which the next words can be found earlier in the
    context, as natural text is full of. That is what makes a pretrained LLM steerable by a prefix it
    can copy from (BLIP-2's frozen LLM reads the 32 projected queries that way); a tiny LM trained on
    isolated captions has no reason to look back and stays deaf to any prefix. ``qa`` adds the
    question–answer texts (LLaVA's stage 2 format, without the image)."""
    rng = np.random.default_rng(seed)
    texts = list(dataset.captions)
    for i in range(len(dataset)):
        variants = dataset.caption_variants(i)
        texts.append(f"{variants[rng.integers(len(variants))]} {dataset.captions[i]}")
        if qa:
            texts += [f"{q} {a}" for q, a in dataset.qa(i)]
    return texts


def _pretrain_lm(lm: torch.nn.Module, texts: list[str], tok: TextTokenizer, opts: VlmOptions, out: Path,
                 console=None) -> None:  # noqa: ANN001
    """Both papers freeze (BLIP-2) or start from (LLaVA) a pretrained LLM: ours first learns the texts."""
    lm.requires_grad_(True)
    _fit(lm, causal_lm, TextBatches(texts, tok, opts.batch_size, opts.seed), opts.lm_steps, opts.lr, out / "lm",
         opts.seed, console)
    lm.requires_grad_(False)


def _fit(model: torch.nn.Module, objective: Callable, data: Any, steps: int, lr: float, out: Path, seed: int,
         console=None) -> list[dict]:  # noqa: ANN001
    cfg = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), eval_every=0,
                      save_every=0, log_every=10, seed=seed, weight_decay=0.05)
    return Trainer(model, objective, data, cfg, out, console=console).fit()


# ----------------------------------------------------------------------------- save / load

_FAMILIES: dict[str, tuple[type, type]] = {"blip2": (Blip2, Blip2Config), "llava": (Llava, LlavaConfig)}


def _save(model: torch.nn.Module, tok: TextTokenizer, out: Path, family: str, opts: VlmOptions) -> None:
    with atomic_path(out / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    tok.save(out / "tokenizer.json")
    write_json(out / "config.json", {"family": family, "config": model.config.to_dict(), "options": asdict(opts)})


def load_vlm(path: str | os.PathLike) -> tuple[torch.nn.Module, TextTokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, config.json) of a ``train_blip2`` / ``train_llava`` folder."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model_dir: expected a folder with config.json from `nanomm train blip2|llava`, "
                                f"got {str(folder)!r}")
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("family") not in _FAMILIES:
        raise ValueError(f"model_dir: config.json family {meta.get('family')!r} is not one of {sorted(_FAMILIES)}")
    cls, cfg_cls = _FAMILIES[meta["family"]]
    model = cls(cfg_cls.from_dict(meta["config"]))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval(), load_tokenizer(folder), meta


# ----------------------------------------------------------------------------- the two recipes

def _setup(out_dir: str | os.PathLike, options: VlmOptions | None, vision_dir: str | os.PathLike | None,
           console=None):  # noqa: ANN001, ANN202
    """Options, output folder, tokenizer, the frozen tower (config, weights), and the three splits at its size."""
    opts, out = options or VlmOptions(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower, weights = vision_tower(opts, out, vision_dir, console)
    kw = dict(image_size=tower.image_size, seed=opts.seed)
    data = [ShapesDataset("train", opts.n_train, **kw), ShapesDataset("test", opts.n_test, **kw),
            ShapesDataset("heldout", opts.n_test, **kw)]
    return opts, out, vlm_tokenizer(), (tower, weights), data


def train_blip2(out_dir: str | os.PathLike, *, options: VlmOptions | None = None,
                vision_dir: str | os.PathLike | None = None, console=None) -> dict[str, Any]:  # noqa: ANN001
    """Train BLIP-2 (both stages) on the shapes into ``out_dir``; returns what results.json holds: caption
    accuracy (all four attributes, and each) on test and held-out pairs, chance levels, trainable counts."""
    opts, out, tok, (tower, weights), (train, test, heldout) = _setup(out_dir, options, vision_dir, console)
    c = multimodal_preset("blip2-tiny")
    q = c.qformer.replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, dec_token_id=tok.token_to_id(DEC_TOKEN),
                          cross_dim=tower.dim)
    torch.manual_seed(opts.seed)
    model = Blip2(Blip2Config(vision=tower, qformer=q, lm=c.lm.replace(vocab_size=tok.vocab_size),
                              embed_dim=c.embed_dim))
    model.vision.load_state_dict(weights)
    _pretrain_lm(model.lm, lm_texts(train, seed=opts.seed), tok, opts, out, console)
    states = {name: tower_states(model, d) for name, d in (("train", train), ("test", test), ("heldout", heldout))}
    data = _WithStates(ImageTextBatches(train, tok, opts.batch_size, seed=opts.seed, augment=False), states["train"])
    counts = {"representation": blip2_stage(model, "representation")}
    _fit(model, stage1, data, opts.stage1_steps, opts.lr, out / "stage1", opts.seed, console)
    counts["generative"] = blip2_stage(model, "generative")
    _fit(model, stage2, data, opts.stage2_steps, opts.lr, out / "stage2", opts.seed, console)
    model.eval()
    results = {"test": evaluate_captions(model, tok, test, states["test"]),
               "heldout": evaluate_captions(model, tok, heldout, states["heldout"]),
               "chance": CHANCE, "trainable": counts}
    _save(model, tok, out, "blip2", opts)
    write_json(out / "results.json", results)
    return results


def train_llava(out_dir: str | os.PathLike, *, options: VlmOptions | None = None, projector: str = "mlp2x_gelu",
                lora: bool = False, vision_dir: str | os.PathLike | None = None,
                console=None) -> dict[str, Any]:  # noqa: ANN001
    """Train LLaVA (both stages) on the shapes into ``out_dir``; returns what results.json holds: question–
    answer accuracy on test and held-out pairs with chance levels. ``lora``: stage 2 trains LoRA (r = 8) on
    the LLM's linear layers instead of the whole LLM, merged into the weights at the end."""
    opts, out, tok, (tower, weights), (train, test, heldout) = _setup(out_dir, options, vision_dir, console)
    c = multimodal_preset("llava-tiny")
    torch.manual_seed(opts.seed)
    model = Llava(LlavaConfig(vision=tower,
                              lm=c.lm.replace(vocab_size=tok.vocab_size), projector=projector,
                              image_token_id=tok.token_to_id(IMAGE_TOKEN)))
    model.vision.load_state_dict(weights)
    _pretrain_lm(model.lm, lm_texts(train, qa=True, seed=opts.seed), tok, opts, out, console)
    states = {name: tower_states(model, d) for name, d in (("train", train), ("test", test), ("heldout", heldout))}
    counts = {"pretrain": llava_stage(model, "pretrain")}
    _fit(model, llava_lm, QABatches(train, tok, opts.batch_size, "caption", opts.seed, states["train"]),
         opts.stage1_steps, opts.lr, out / "stage1", opts.seed, console)
    counts["finetune"] = llava_stage(model, "finetune")
    if lora:
        from nanomm import peft

        llava_stage(model, "pretrain")  # the projector keeps learning; peft freezes the LLM and adds LoRA
        report = peft.apply(model.lm, peft.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
        counts["finetune"] = {"trainable": report.trainable + sum(p.numel() for p in model.projector.parameters()),
                              "lora": report.trainable}
    _fit(model, llava_lm, QABatches(train, tok, opts.batch_size, "qa", opts.seed, states["train"]),
         opts.stage2_steps, opts.lr, out / "stage2", opts.seed, console)
    if lora:
        peft.merge_and_unload(model.lm)
    model.eval()
    results = {"test": evaluate_qa(model, tok, test, states["test"]),
               "heldout": evaluate_qa(model, tok, heldout, states["heldout"]), "trainable": counts}
    _save(model, tok, out, "llava", opts)
    write_json(out / "results.json", results)
    return results


def ask(model_dir: str | os.PathLike, image_path: str | os.PathLike, question: str = "") -> str:
    """A trained LLaVA's answer to ``question`` about the image; a BLIP-2 returns its caption."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a str, got {type(question).__name__}")
    model, tok, meta = load_vlm(model_dir)
    pixels = load_image(image_path, model.config.vision.image_size)[None]  # (1, 3, H, W)
    if meta["family"] == "blip2":
        return tok.decode(model.caption(pixels, tok.bos_id, tok.eos_id, max_new_tokens=12)[0]).strip()
    return answer(model, tok, pixels, [question], max_new_tokens=8)[0]
