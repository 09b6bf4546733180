"""Vision and CLIP configurations: help-annotated dataclasses and named presets, as plain data.

  ViTConfig       a Vision Transformer: the image cut into P×P patches, each patch a token, plus a
                  [CLS] token, learned positions, pre-LN blocks                  (Dosovitskiy et al., 2021)
                  tokens = (image_size / patch_size)² + 1: ViT-L/14 at 224 px → 16² + 1 = 257
  CLIPTextConfig  CLIP's text tower: a causal transformer pooled at the end-of-text token
  CLIPConfig      both towers, the width of the shared embedding space, the initial temperature
                                                                                (Radford et al., 2021)

Configs are ``nanomm.config.Config`` dataclasses: ``from_dict`` rejects unknown keys and names the
valid ones, ``describe(config)`` lists the helps. Presets live in ``VISION_PRESETS`` (name → family
and the fields that differ from its defaults); ``vision_preset(name)`` builds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nanomm.config import Config, option
from nanomm.models.config import BACKENDS

__all__ = ["ViTConfig", "CLIPTextConfig", "CLIPConfig", "VISION_PRESETS", "vision_preset", "vision_preset_names",
           "VIT_ACTIVATIONS", "CLIP_MEAN", "CLIP_STD"]

# quick_gelu is x·σ(1.702x), the GELU approximation OpenAI's CLIP was trained with
VIT_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")
FINAL_NORMS = ("cls", "all")
POOLINGS = ("eos", "argmax")

# the per-channel mean and std of OpenAI CLIP's image preprocessing (RGB, pixels in [0, 1])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _tower_checks(config: Any) -> None:
    if config.dim % config.n_head:
        raise ValueError(f"n_head: expected a divisor of dim={config.dim}, got {config.n_head}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {config.dropout!r}")


@dataclass
class ViTConfig(Config):
    """A ViT image encoder; the defaults are CLIP's ViT-B/16 vision tower."""

    family: ClassVar[str] = "vit"
    image_size: int = option(224, "side of the square input image in pixels")
    patch_size: int = option(16, "side of a square patch in pixels; must divide image_size")
    channels: int = option(3, "input channels (RGB)")
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads")
    dim: int = option(768, "hidden width d")
    ff_dim: int = option(3072, "feed-forward inner width (4d)")
    activation: str = option("quick_gelu", "feed-forward activation (OpenAI CLIP: quick_gelu; ViT, EVA: gelu)",
                         VIT_ACTIVATIONS)
    layer_norm_eps: float = option(1e-5, "LayerNorm epsilon")
    pre_norm: bool = option(True, "LayerNorm on the token embeddings before the first block (CLIP's ln_pre)")
    final_norm: str = option("cls", "where the last LayerNorm goes: 'cls' only the pooled [CLS] (CLIP), "
                                "'all' every output token (ViT, BLIP-2's EVA)", FINAL_NORMS)
    patch_bias: bool = option(False, "bias in the patch-embedding convolution (CLIP: no; ViT, EVA: yes)")
    dropout: float = option(0.0, "dropout on embeddings and residual branches")
    init_std: float = option(0.02, "std of the normal weight init")
    backend: str = option("auto", "attention backend", BACKENDS)

    def __post_init__(self) -> None:
        super().__post_init__()  # choices
        _positive(self, ("image_size", "patch_size", "channels", "n_layer", "n_head", "dim", "ff_dim"))
        _tower_checks(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size={self.image_size}, got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_tokens(self) -> int:
        """Sequence length inside the ViT: the patches and [CLS]."""
        return self.n_patches + 1


@dataclass
class CLIPTextConfig(Config):
    """CLIP's text encoder: token + learned positions, causal pre-LN blocks, final LayerNorm, pooled at EOS."""

    family: ClassVar[str] = "clip_text"
    vocab_size: int = option(49408, "BPE vocabulary size")
    max_positions: int = option(77, "context length (rows of the position table)")
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(8, "attention heads")
    dim: int = option(512, "hidden width d")
    ff_dim: int = option(2048, "feed-forward inner width (4d)")
    activation: str = option("quick_gelu", "feed-forward activation", VIT_ACTIVATIONS)
    layer_norm_eps: float = option(1e-5, "LayerNorm epsilon")
    eos_token_id: int = option(49407, "id of the end-of-text token whose final state is the text's feature")
    pad_token_id: int = option(1, "id used to pad a batch (masked out of attention)")
    pooling: str = option("eos", "which position is pooled: 'eos' the first eos_token_id, 'argmax' the largest id "
                             "(OpenAI's original rule, right when EOS is the largest id)", POOLINGS)
    dropout: float = option(0.0, "dropout on embeddings and residual branches")
    init_std: float = option(0.02, "std of the normal weight init")
    backend: str = option("auto", "attention backend", BACKENDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, ("vocab_size", "max_positions", "n_layer", "n_head", "dim", "ff_dim"))
        _tower_checks(self)
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}: expected an id in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


@dataclass
class CLIPConfig(Config):
    """Both towers and the shared embedding space they are projected into."""

    family: ClassVar[str] = "clip"
    vision: ViTConfig = field(default_factory=ViTConfig, metadata={"help": "the image tower (a ViTConfig)"})
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig, metadata={"help": "the text tower"})
    projection_dim: int = option(512, "width of the shared image-text embedding space")
    logit_scale_init: float = option(math.log(1 / 0.07), "initial log(1/τ): τ = 0.07 as in CLIP §2.5")

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = CLIPTextConfig.from_dict(self.text)
        for name, cls in (("vision", ViTConfig), ("text", CLIPTextConfig)):
            if not isinstance(getattr(self, name), cls):
                got = type(getattr(self, name)).__name__
                raise TypeError(f"{name}: expected a {cls.__name__} or a dict, got {got}")
        super().__post_init__()
        _positive(self, ("projection_dim",))
        if not math.isfinite(self.logit_scale_init):
            raise ValueError(f"logit_scale_init: expected a finite number, got {self.logit_scale_init!r}")


VISION_FAMILIES: dict[str, type[Config]] = {"vit": ViTConfig, "clip": CLIPConfig}

_L14 = dict(patch_size=14, n_layer=24, n_head=16, dim=1024, ff_dim=4096)
_B32 = dict(patch_size=32)
# the text towers of OpenAI's CLIP: 512 wide for B, 768 wide for L
_TEXT_L = dict(n_head=12, dim=768, ff_dim=3072)
# a tower that trains in a few CPU minutes on the 48 px shapes: 3×3 patches of 16 px, which tile the
# scenes' 3×3 layout (a shape mostly sits in one patch), + [CLS] = 10 tokens
_VIT_TINY = dict(image_size=48, patch_size=16, n_layer=3, n_head=4, dim=96, ff_dim=384)
# the text tower of clip-tiny; vocab_size/eos/pad are placeholders that the caption tokenizer replaces
_TEXT_TINY = dict(vocab_size=128, max_positions=24, n_layer=2, n_head=4, dim=96, ff_dim=384, eos_token_id=3,
                  pad_token_id=0)

VISION_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit-b-16": ("vit", {}),
    "vit-b-32": ("vit", _B32),
    "vit-l-14": ("vit", _L14),  # CLIP ViT-L/14 at 224 px: 257 tokens (BLIP-2, LLaVA-1)
    "vit-l-14-336": ("vit", {**_L14, "image_size": 336}),  # LLaVA-1.5's tower: 24² + 1 = 577 tokens
    # BLIP-2's EVA-CLIP ViT-g/14 as transformers builds it: 39 of its 40 blocks, every token normalised
    "vit-g-14": ("vit", dict(patch_size=14, n_layer=39, n_head=16, dim=1408, ff_dim=6144, activation="gelu",
                             layer_norm_eps=1e-6, pre_norm=False, final_norm="all", patch_bias=True)),
    "vit-tiny": ("vit", _VIT_TINY),
    "clip-vit-b-16": ("clip", {}),
    "clip-vit-b-32": ("clip", dict(vision=_B32)),
    "clip-vit-l-14": ("clip", dict(vision=_L14, text=_TEXT_L, projection_dim=768)),
    "clip-tiny": ("clip", dict(vision=_VIT_TINY, text=_TEXT_TINY, projection_dim=64)),
}


def vision_preset_names() -> list[str]:
    return list(VISION_PRESETS)


def vision_preset(name: str, **overrides: Any) -> ViTConfig | CLIPConfig:
    """The config of a named vision preset. For CLIP presets, ``vision=`` / ``text=`` overrides are
    dicts merged into that tower's fields."""
    if name not in VISION_PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; valid presets are {vision_preset_names()}")
    family, fields = VISION_PRESETS[name]
    merged = {**fields, **overrides}
    if family == "clip":
        for tower in ("vision", "text"):
            if isinstance(overrides.get(tower), dict):
                merged[tower] = {**fields.get(tower, {}), **overrides[tower]}
    return VISION_FAMILIES[family].from_dict(merged)
