"""Images that ship with nanomm: procedural shapes it draws itself, and scikit-learn's scanned digits.

  ShapesDataset   one shape per image: 4 shapes × 6 colours × 9 positions × 2 sizes on varied
                  backgrounds, with templated captions ("a small red circle at the top left") and
                  question–answer pairs. Four colour–shape pairs (HELD_OUT) never appear in "train"
                  or "test"; split "heldout" has only those, for zero-shot tests of composition.
  DigitsDataset   the 1,797 real 8×8 scans of ``sklearn.datasets.load_digits()`` upsampled, captioned
                  "a photo of the digit 3"; a seeded 80/20 train/test split.

Everything is deterministic by seed: sample i of a split is drawn from its own generator
(seed, split, i), so it does not depend on how many samples are asked for. Images are kept as uint8
(N, H, W, 3) and given out as float tensors (B, 3, H, W) normalised with CLIP's mean and std.
``caption_tokenizer()`` is a fixed word-level vocabulary of every word the captions, questions and
prompts use. PNG/JPEG in and out through Pillow: ``load_image``, ``save_image``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from nanomm.data.lm import Batcher, Batches
from nanomm.data.tokenizer import TextTokenizer
from nanomm.io import atomic_path

__all__ = ["COLOURS", "SHAPES", "POSITIONS", "SIZES", "HELD_OUT", "CAPTION_TEMPLATES", "SHAPE_PROMPTS",
           "shape_captions", "shape_qa", "render_shape", "fill_prompt", "digits_arrays",
           "DIGIT_PROMPTS", "DIGIT_WORDS", "ImageTextDataset", "ShapesDataset", "DigitsDataset", "ImageTextBatches",
           "caption_tokenizer", "to_tensor", "to_pil", "load_image", "save_image", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = nanomm.models.vision_config.CLIP_MEAN (data stands apart)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 235),
    "yellow": (240, 215, 20), "purple": (150, 50, 200), "orange": (250, 135, 10),
}
# position name -> (column, row) on a 3×3 grid, and the phrase a caption uses
POSITIONS: dict[str, tuple[int, int, str]] = {
    "top left": (0, 0, "at the top left"), "top": (1, 0, "at the top"), "top right": (2, 0, "at the top right"),
    "left": (0, 1, "on the left"), "center": (1, 1, "in the center"), "right": (2, 1, "on the right"),
    "bottom left": (0, 2, "at the bottom left"), "bottom": (1, 2, "at the bottom"),
    "bottom right": (2, 2, "at the bottom right"),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.19}  # half-width as a fraction of the image side
# never together in "train"/"test"; each colour and each shape still appears there with others
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "cross"), ("blue", "circle"),
                                         ("yellow", "square"))
CAPTION_TEMPLATES = ("a {size} {colour} {shape} {where}", "a {colour} {shape} {where}", "a {size} {colour} {shape}",
                     "a {colour} {shape}", "a photo of a {colour} {shape}", "there is a {colour} {shape} {where}")
SHAPE_PROMPTS = ("a photo of a {}", "a {}")  # zero-shot prompts, class name "red circle"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {d}", "a handwritten {d}", "the number {word}", "a photo of the number {word}")
DIGIT_PROMPTS = ("a photo of the digit {}", "a handwritten {}")  # class name "3"


# ----------------------------------------------------------------------------- drawing

def _circle(d: ImageDraw.ImageDraw, x: float, y: float, r: float, c: tuple) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=c)


def _square(d: ImageDraw.ImageDraw, x: float, y: float, r: float, c: tuple) -> None:
    s = 0.85 * r  # about the area of the circle of radius r
    d.rectangle([x - s, y - s, x + s, y + s], fill=c)


def _triangle(d: ImageDraw.ImageDraw, x: float, y: float, r: float, c: tuple) -> None:
    d.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=c)


def _cross(d: ImageDraw.ImageDraw, x: float, y: float, r: float, c: tuple) -> None:
    t = 0.38 * r
    d.rectangle([x - r, y - t, x + r, y + t], fill=c)
    d.rectangle([x - t, y - r, x + t, y + r], fill=c)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, float, float, float, tuple], None]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross,
}


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A dull background colour: a grey level with a slight tint, never a saturated shape colour."""
    return np.clip(rng.uniform(25, 205) + rng.uniform(-18, 18, 3), 0, 255)


# background kind -> (side, rng) -> float (side, side, 3) canvas
BACKGROUNDS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "flat": lambda n, rng: np.broadcast_to(_muted(rng), (n, n, 3)).astype(np.float32),
    "gradient": lambda n, rng: (lambda a, b, t: a + (b - a) * t)(
        _muted(rng), _muted(rng), np.linspace(0, 1, n)[:, None, None] if rng.random() < 0.5
        else np.linspace(0, 1, n)[None, :, None]).astype(np.float32) * np.ones((n, n, 1), np.float32),
    "noise": lambda n, rng: (_muted(rng) + rng.normal(0, 14, (n, n, 3))).astype(np.float32),
}

_SPLITS = {"train": 0, "test": 1, "heldout": 2}


def render_shape(shape: str, colour: str, position: str, size: str, image_size: int,
                 rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """One scene as uint8 (image_size, image_size, 3); drawn 4× larger and box-filtered down (anti-aliased)."""
    n = image_size * supersample
    kind = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    canvas = Image.fromarray(np.clip(BACKGROUNDS[kind](n, rng), 0, 255).astype(np.uint8))
    col, row, _ = POSITIONS[position]
    x = (col + 0.5 + rng.uniform(-0.12, 0.12)) * n / 3  # jitter inside the cell
    y = (row + 0.5 + rng.uniform(-0.12, 0.12)) * n / 3
    r = SIZES[size] * n * rng.uniform(0.9, 1.1)
    SHAPES[shape](ImageDraw.Draw(canvas), x, y, r, COLOURS[colour])
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))


# ----------------------------------------------------------------------------- tensors and files

def to_tensor(pixels: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
    """uint8 (..., H, W, 3) or a PIL image → float32 (..., 3, H, W) normalised with CLIP's mean and std."""
    if isinstance(pixels, Image.Image):
        pixels = np.array(pixels.convert("RGB"))  # a writable copy
    arr = np.asarray(pixels)
    x = torch.as_tensor(arr if arr.flags.writeable else arr.copy())  # torch refuses to alias read-only memory
    if x.dtype != torch.uint8 or x.dim() < 3 or x.shape[-1] != 3:
        raise ValueError(f"pixels: expected uint8 (..., H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.movedim(-1, -3).float() / 255.0  # (..., 3, H, W)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def to_pil(image: torch.Tensor) -> Image.Image:
    """A normalised (3, H, W) tensor back to an RGB image."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a (3, H, W) tensor, got {got}")
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    x = ((image.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Read a PNG/JPEG, resize its shorter side to ``image_size`` (bicubic), crop the centre square:
    a normalised (3, image_size, image_size) tensor, CLIP's preprocessing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no image file at {str(path)!r}")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    k = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * k)), max(image_size, round(h * k))), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - image_size) // 2, (img.size[1] - image_size) // 2
    return to_tensor(img.crop((left, top, left + image_size, top + image_size)))


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def save_image(image: torch.Tensor | np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write a normalised (3, H, W) tensor, a uint8 (H, W, 3) array or a PIL image as PNG or JPEG
    (by the suffix), atomically."""
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"path: expected a suffix in {sorted(_FORMATS)}, got {path.name!r}")
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        # JPEG: no chroma subsampling, which would smear a small image's colour edges over 2×2 blocks
        options = {"quality": 95, "subsampling": 0} if _FORMATS[path.suffix.lower()] == "JPEG" else {}
        image.save(tmp, format=_FORMATS[path.suffix.lower()], **options)
    return path


# ----------------------------------------------------------------------------- captions

def shape_captions(colour: str, shape: str, position: str, size: str) -> list[str]:
    """Every caption template filled in for one scene; the first is the canonical caption."""
    return [_articles(t.format(size=size, colour=colour, shape=shape, where=POSITIONS[position][2]))
            for t in CAPTION_TEMPLATES]


def fill_prompt(template: str, name: str) -> str:
    """A zero-shot prompt for class ``name`` with the article fixed: ("a photo of a {}", "orange circle")
    → "a photo of an orange circle"."""
    return _articles(template.format(name))


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange" → "an orange"


def shape_qa(colour: str, shape: str, position: str, size: str, seed: int = 0) -> list[tuple[str, str]]:
    """Questions about one scene and their one-word answers; the "no" question's colour is drawn by seed."""
    other = [c for c in COLOURS if c != colour][np.random.default_rng(seed).integers(len(COLOURS) - 1)]
    return [("what colour is the shape?", colour), ("what shape is it?", shape),
            (f"where is the {shape}?", position), (f"is the {shape} small or large?", size),
            (_articles(f"is there a {colour} {shape}?"), "yes"), (_articles(f"is there a {other} {shape}?"), "no")]


# ----------------------------------------------------------------------------- datasets

class ImageTextDataset:
    """Images with captions and labels. ``pixels`` uint8 (N, H, W, 3); ``captions`` the canonical
    caption of each image; ``labels[attr]`` (N,) indices into ``classes[attr]``."""

    pixels: np.ndarray
    captions: list[str]
    labels: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
    prompts: tuple[str, ...]  # zero-shot templates that match the captions

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) at ``indices`` (all when None)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < -len(self) or idx.max() >= len(self))):
            raise IndexError(f"indices: expected ints in [0, {len(self)}), got {idx.tolist()[:8]}")
        return to_tensor(self.pixels[idx])

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images([i])[0], "caption": self.captions[i],
                **{k: int(v[i]) for k, v in self.labels.items()}}

    def caption_variants(self, i: int) -> list[str]:
        """Every caption template filled in for image i (the first is ``captions[i]``)."""
        raise NotImplementedError

    def qa(self, i: int) -> list[tuple[str, str]]:
        """Question–answer pairs about image i."""
        raise NotImplementedError


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split: expected one of {list(allowed)}, got {split!r}")


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")


class ShapesDataset(ImageTextDataset):
    """``n`` procedural scenes of one split: "train" and "test" draw from the colour–shape pairs not in
    HELD_OUT, "heldout" only from HELD_OUT."""

    prompts = SHAPE_PROMPTS

    def __init__(self, split: str = "train", n: int = 2000, image_size: int = 48, seed: int = 0):
        _check_split(split, list(_SPLITS))
        _check_size(image_size)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        self.split, self.seed, self.image_size = split, seed, image_size
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        combos = [p for p in combos if (p in HELD_OUT) == (split == "heldout")]
        self.classes = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS),
                        "size": list(SIZES), "object": [f"{c} {s}" for c in COLOURS for s in SHAPES]}
        rows, pixels = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLITS[split], i])
            colour, shape = combos[rng.integers(len(combos))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            pixels.append(render_shape(shape, colour, position, size, image_size, rng))
            rows.append((colour, shape, position, size, int(rng.integers(1 << 31))))
        self.pixels = np.stack(pixels)
        self.scenes = rows
        self.labels = {k: torch.tensor([self.classes[k].index(r[j]) for r in rows])
                       for j, k in enumerate(("colour", "shape", "position", "size"))}
        self.labels["object"] = self.labels["colour"] * len(SHAPES) + self.labels["shape"]
        self.captions = [self.caption_variants(i)[0] for i in range(n)]

    def caption_variants(self, i: int) -> list[str]:
        return shape_captions(*self.scenes[i][:4])

    def qa(self, i: int) -> list[tuple[str, str]]:
        return shape_qa(*self.scenes[i])


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s images (1797, 8, 8) in 0..16 and targets (1797,), read from the CSV that
    scikit-learn ships; importing sklearn.datasets itself takes seconds and is the fallback."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the digits come with scikit-learn: pip install scikit-learn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


class DigitsDataset(ImageTextDataset):
    """scikit-learn's handwritten digits, upsampled to ``image_size`` (bilinear), dark ink on light paper."""

    prompts = DIGIT_PROMPTS

    def __init__(self, split: str = "train", image_size: int = 48, seed: int = 0, test_fraction: float = 0.2):
        _check_split(split, ("train", "test"))
        _check_size(image_size)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
        images, target = digits_arrays()
        order = np.random.default_rng([seed, 7]).permutation(len(target))
        n_test = round(len(order) * test_fraction)
        idx = np.sort(order[:n_test] if split == "test" else order[n_test:])
        self.split, self.seed, self.image_size = split, seed, image_size
        ink = (255 - images[idx] * (255 / 16)).astype(np.uint8)  # 0..16 → white paper, black ink
        self.pixels = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size),
                                                                      Image.Resampling.BILINEAR)) for im in ink])
        self.pixels = np.repeat(self.pixels[..., None], 3, axis=-1)  # grey → RGB
        self.source_index = torch.as_tensor(idx)
        self.labels = {"digit": torch.as_tensor(target[idx])}
        self.classes = {"digit": [str(d) for d in range(10)]}
        self.captions = [self.caption_variants(i)[0] for i in range(len(idx))]

    def caption_variants(self, i: int) -> list[str]:
        d = int(self.labels["digit"][i])
        return [t.format(d=d, word=DIGIT_WORDS[d]) for t in DIGIT_TEMPLATES]

    def qa(self, i: int) -> list[tuple[str, str]]:
        d = int(self.labels["digit"][i])
        return [("what digit is this?", str(d)), ("which number is written?", DIGIT_WORDS[d])]


# ----------------------------------------------------------------------------- text

def _all_texts() -> list[str]:
    texts = [t.format("") for t in SHAPE_PROMPTS + DIGIT_PROMPTS]
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                for size in SIZES:
                    texts += shape_captions(colour, shape, position, size)
                    texts += [q + " " + a for q, a in shape_qa(colour, shape, position, size)]
    texts += [t.format(d=d, word=DIGIT_WORDS[d]) for t in DIGIT_TEMPLATES for d in range(10)]
    texts += ["what digit is this?", "which number is written?", " ".join(DIGIT_WORDS), " ".join(POSITIONS)]
    return texts


def caption_tokenizer() -> TextTokenizer:
    """A word-level tokenizer over every word of the captions, questions, answers and prompts:
    <pad> 0, <unk> 1, <s> 2, </s> 3, then the words in sorted order; encodes as "<s> words </s>"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    split = pre_tokenizers.Whitespace()  # words and punctuation ("?") become separate tokens
    words = sorted({w for t in _all_texts() for w, _ in split.pre_tokenize_str(t.lower())})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tok.add_special_tokens(specials)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return TextTokenizer(tok)


# ----------------------------------------------------------------------------- batches

class ImageTextBatches(Batches):
    """Endless, resumable batches {"pixel_values" (B, 3, H, W), "input_ids" (B, T), "attention_mask"
    (B, T), "index" (B,)} of a dataset. ``augment=True`` picks a caption template per image (seeded
    by the batch, so a resumed run replays it); False uses the canonical caption."""

    def __init__(self, dataset: ImageTextDataset, tokenizer: TextTokenizer, batch_size: int, *, seed: int = 0,
                 augment: bool = True):
        if not isinstance(dataset, ImageTextDataset):
            raise TypeError(f"dataset: expected an ImageTextDataset, got {type(dataset).__name__}")
        self.dataset, self.tokenizer, self.augment = dataset, tokenizer, augment
        self.batcher = Batcher(len(dataset), batch_size, seed=seed)

    def batch(self, indices: Sequence[int], seed: int | None = None) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        if self.augment:
            texts = [(lambda v: v[rng.integers(len(v))])(self.dataset.caption_variants(int(i))) for i in indices]
        else:
            texts = [self.dataset.captions[int(i)] for i in indices]
        enc = self.tokenizer.encode_batch(texts)
        return {"pixel_values": self.dataset.images(indices), **enc, "index": torch.as_tensor(indices)}
