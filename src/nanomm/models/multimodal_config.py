"""Configurations of the vision–language models: Q-Former, BLIP-2 and LLaVA, with their presets.

  QFormerConfig  BERT-base-shaped encoder with learnable queries, cross-attention every other layer
                 and separate query / text feed-forward networks          (Li et al., 2023, BLIP-2 §3.1)
  Blip2Config    frozen ViT + Q-Former + linear projection into a frozen decoder LM
  LlavaConfig    frozen CLIP vision tower + projector (table PROJECTORS) + LLaMA  (Liu et al., 2023; 2024)

A composite config holds its parts as configs: the vision tower's as a ViTConfig
(``nanomm.models.vision_config``), the language model's as a nanomm GPTConfig or LlamaConfig.
``to_dict`` / ``from_dict`` round-trip through JSON; the LM part carries its family name.

The BLIP-2 Q-Former preset reproduces LAVIS's ``Blip2Qformer``: vocabulary 30522 + [DEC] = 30523,
512 positions, no segment embeddings, 12 × 768 layers, cross-attention with K/V width 1408 (EVA
ViT-g/14) in layers 0, 2, …, 10, 32 queries, MLM-style LM head tied to the word embedding. Counted by
``nanomm.models.qformer.count_qformer_params``: 186,307,387 (the paper's "188M").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nanomm.config import option
from nanomm.models.config import ACTIVATIONS, BACKENDS, FAMILIES, GPTConfig, LlamaConfig, ModelConfig, preset
from nanomm.models.vision_config import ViTConfig, vision_preset

__all__ = ["QFormerConfig", "Blip2Config", "LlavaConfig", "PROJECTOR_NAMES", "FEATURE_SELECTS",
           "MULTIMODAL_PRESETS", "multimodal_preset", "multimodal_preset_names", "lm_config_from_dict"]

PROJECTOR_NAMES = ("linear", "mlp2x_gelu")  # LLaVA-1, LLaVA-1.5 (built by nanomm.models.llava.PROJECTORS)
FEATURE_SELECTS = ("patch", "full")  # drop the [CLS] row (LLaVA, HF "default") or keep every token


@dataclass
class QFormerConfig(ModelConfig):
    """Q-Former: n_query learnable queries and text share self-attention; queries alone cross-attend."""

    family: ClassVar[str] = "qformer"
    vocab_size: int = option(30523, "WordPiece vocabulary: BERT's 30522 + [DEC], the decoding start token of ITG")
    max_positions: int = option(512, "learned text positions (queries carry none: they are a set)")
    n_layer: int = option(12, "layers (BERT-base)")
    n_head: int = option(12, "attention heads")
    dim: int = option(768, "hidden width d, also the width of each query")
    ff_dim: int = option(3072, "feed-forward inner width (query and text FFNs alike)")
    n_query: int = option(32, "learnable query tokens: the image is summarised into this many vectors")
    cross_dim: int = option(1408, "width of the image features the queries attend to (EVA ViT-g/14: 1408)")
    cross_attention_freq: int = option(2, "cross-attention in layers 0, f, 2f, …")
    text_ffn: bool = option(True, "separate FFNs for text tokens (stage 1 needs them; stage 2 ignores them)")
    lm_head: bool = option(True, "MLM-style LM head for ITG (dense, GELU, LayerNorm, decoder tied to the words)")
    activation: str = option("gelu", "feed-forward activation (BERT: exact erf GELU)", ACTIVATIONS)
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon (BERT: 1e-12)")
    dropout: float = option(0.1, "dropout on embeddings and residual branches")
    init_std: float = option(0.02, "std of the truncated-normal weight init, and of the queries")
    pad_token_id: int = option(0, "id of [PAD]")
    dec_token_id: int = option(30522, "[DEC]: replaces [CLS] as the first token of ITG's decoder input")
    backend: str = option("auto", "attention backend", BACKENDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("pad_token_id", "dec_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}: expected an id in [0, vocab_size={self.vocab_size}), got {value!r}")
        for name in ("n_query", "cross_dim", "cross_attention_freq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.lm_head and not self.text_ffn:
            raise ValueError("lm_head: expected False when text_ffn=False (text tokens need their FFN to be "
                             "decoded), got True")

    def has_cross(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


def lm_config_from_dict(d: dict[str, Any]) -> GPTConfig | LlamaConfig:
    """{"family": "gpt" | "llama", ...fields} -> the nanomm decoder config."""
    if not isinstance(d, dict) or d.get("family") not in ("gpt", "llama"):
        got = d.get("family") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"lm: expected a dict with family 'gpt' or 'llama', got {got!r}")
    return FAMILIES[d["family"]].from_dict({k: v for k, v in d.items() if k != "family"})


def _lm_to_dict(c: ModelConfig) -> dict[str, Any]:
    return {"family": c.family, **c.to_dict()}


def _check_vision(vision: Any) -> None:
    if not isinstance(vision, ViTConfig):
        raise TypeError(f"vision: expected a ViTConfig, got {type(vision).__name__}")


class _Composite:
    """to_dict / from_dict / replace for configs whose fields are configs."""

    _sub: ClassVar[dict[str, tuple[Any, Any]]] = {}  # field -> (from_dict, to_dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {valid}")
        parts = {k: (cls._sub[k][0](v) if k in cls._sub and isinstance(v, dict) else v) for k, v in d.items()}
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = self._sub[f.name][1](value) if f.name in self._sub else value
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class Blip2Config(_Composite):
    """BLIP-2: image → frozen ViT → LayerNorm → Q-Former → linear → frozen decoder LM."""

    family: ClassVar[str] = "blip2"
    _sub: ClassVar[dict] = {"vision": (ViTConfig.from_dict, ViTConfig.to_dict),
                            "qformer": (QFormerConfig.from_dict, QFormerConfig.to_dict),
                            "lm": (lm_config_from_dict, _lm_to_dict)}
    vision: ViTConfig = field(default_factory=lambda: vision_preset("vit-tiny"),
                              metadata={"help": "the frozen image encoder (a ViTConfig)"})
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(**_QFORMER_TINY),
                                   metadata={"help": "the Q-Former"})
    lm: Any = field(default_factory=lambda: preset("gpt-tiny", **_GPT_TINY),
                    metadata={"help": "the frozen decoder LM"})
    embed_dim: int = option(32, "width of the ITC space (vision_proj, text_proj)")
    temperature: float = option(0.07, "initial ITC temperature τ (learned, clamped to [0.001, 0.5] as in LAVIS)")
    vision_feature_layer: int = option(-1, "ViT hidden state fed to the Q-Former. BLIP-2 §3.3 takes the second last "
                                       "block of EVA ViT-g; the vit-g-14 preset already stops there (39 of 40 "
                                       "blocks, as transformers), so its last state is the one")

    def __post_init__(self) -> None:
        _check_vision(self.vision)
        if not isinstance(self.qformer, QFormerConfig):
            raise TypeError(f"qformer: expected a QFormerConfig, got {type(self.qformer).__name__}")
        if not isinstance(self.lm, (GPTConfig, LlamaConfig)):
            raise TypeError(f"lm: expected a GPTConfig or LlamaConfig, got {type(self.lm).__name__}")
        if self.qformer.cross_dim != self.vision.dim:
            raise ValueError(f"qformer.cross_dim: expected the vision width {self.vision.dim}, "
                             f"got {self.qformer.cross_dim}")
        if not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"temperature: expected a value in [0.001, 0.5], got {self.temperature}")

    @property
    def vocab_size(self) -> int:
        """The LM's vocabulary (what ``generate`` checks token ids against)."""
        return self.lm.vocab_size


@dataclass
class LlavaConfig(_Composite):
    """LLaVA: image → frozen CLIP ViT (layer −2) → projector → image tokens spliced into LLaMA's input."""

    family: ClassVar[str] = "llava"
    _sub: ClassVar[dict] = {"vision": (ViTConfig.from_dict, ViTConfig.to_dict),
                            "lm": (lm_config_from_dict, _lm_to_dict)}
    vision: ViTConfig = field(default_factory=lambda: vision_preset("vit-tiny"),
                              metadata={"help": "the frozen CLIP vision tower (a ViTConfig)"})
    lm: Any = field(default_factory=lambda: preset("llama-tiny", **_LLAMA_TINY),
                    metadata={"help": "the LLaMA decoder"})
    projector: str = option("mlp2x_gelu", "'linear' (LLaVA-1) or 'mlp2x_gelu' (LLaVA-1.5)", PROJECTOR_NAMES)
    vision_feature_layer: int = option(-2, "CLIP hidden state used (LLaVA: the second last layer)")
    feature_select: str = option("patch", "'patch' drops [CLS] (LLaVA), 'full' keeps it", FEATURE_SELECTS)
    image_token_id: int = option(511, "the <image> placeholder's id in the LM vocabulary (HF LLaVA-1.5: 32000)")

    def __post_init__(self) -> None:
        _check_vision(self.vision)
        if not isinstance(self.lm, (GPTConfig, LlamaConfig)):
            raise TypeError(f"lm: expected a GPTConfig or LlamaConfig, got {type(self.lm).__name__}")
        for name, choices in (("projector", PROJECTOR_NAMES), ("feature_select", FEATURE_SELECTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {getattr(self, name)!r}")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(f"image_token_id: expected an id in [0, lm.vocab_size={self.lm.vocab_size}), "
                             f"got {self.image_token_id}")

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size


# ----------------------------------------------------------------------------- presets

# a Q-Former, LMs and a vision tower that train in CPU minutes; vocabularies are placeholders that the
# recipe's tokenizer replaces (config.replace(lm=config.lm.replace(vocab_size=...)))
_QFORMER_TINY = dict(vocab_size=512, max_positions=64, n_layer=2, n_head=4, dim=64, ff_dim=128, n_query=8,
                     cross_dim=96, dropout=0.0, dec_token_id=511)
_GPT_TINY = dict(vocab_size=512, max_positions=128, n_layer=2, n_head=4, dim=64, ff_dim=256, dropout=0.0)
_LLAMA_TINY = dict(vocab_size=512, max_positions=128, n_layer=2, n_head=4, n_kv_head=2, dim=64, ff_dim=172)
# OPT-2.7B (BLIP-2's smallest decoder) written as a nanomm GPT: pre-LN, ReLU, learned positions, tied
# head. OPT's position table has 2 more rows (its offset of 2): 5,120 parameters not counted here.
_OPT_2_7B = dict(vocab_size=50272, max_positions=2048, n_layer=32, n_head=32, dim=2560, ff_dim=10240,
                 activation="relu")
# LLaMA-7B/Vicuna-7B with LLaVA-1.5's vocabulary as transformers ships it: 32000 + <image> + padding to 32064
_VICUNA_7B = dict(vocab_size=32064)

# name -> (config class, parts): a part is (preset name, overrides) for vision / qformer / lm, or a value
MULTIMODAL_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "blip2-qformer": (QFormerConfig, {}),
    "qformer-tiny": (QFormerConfig, _QFORMER_TINY),
    "blip2-opt-2.7b": (Blip2Config, dict(vision=("vit-g-14", {}), qformer=("blip2-qformer", {}),
                                         lm=("gpt2", _OPT_2_7B), embed_dim=256)),
    "blip2-tiny": (Blip2Config, dict(vision=("vit-tiny", {}), qformer=("qformer-tiny", {}),
                                     lm=("gpt-tiny", _GPT_TINY), embed_dim=32)),
    "llava-7b": (LlavaConfig, dict(vision=("vit-l-14", {}), lm=("llama-7b", _VICUNA_7B), projector="linear")),
    "llava-1.5-7b": (LlavaConfig, dict(vision=("vit-l-14-336", {}), lm=("llama-7b", _VICUNA_7B))),
    "llava-tiny": (LlavaConfig, dict(vision=("vit-tiny", {}), lm=("llama-tiny", _LLAMA_TINY),
                                     image_token_id=511)),
}

_PART_BUILDERS: dict[str, Any] = {
    "vision": vision_preset,
    "qformer": lambda name, **kw: multimodal_preset(name, **kw),
    "lm": preset,
}


def multimodal_preset_names() -> list[str]:
    return list(MULTIMODAL_PRESETS)


def multimodal_preset(name: str, **overrides: Any):
    """The config of a named multimodal preset, with optional field overrides (whole configs for parts)."""
    if name not in MULTIMODAL_PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; valid presets are {multimodal_preset_names()}")
    cls, fields = MULTIMODAL_PRESETS[name]
    built = {k: (_PART_BUILDERS[k](v[0], **v[1]) if k in _PART_BUILDERS else v) for k, v in fields.items()}
    return cls.from_dict({**built, **overrides}) if cls is QFormerConfig else cls(**{**built, **overrides})
