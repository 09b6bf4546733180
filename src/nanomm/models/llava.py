"""LLaVA: a CLIP ViT's patch features, projected to word-embedding width, spliced into a LLaMA's input.

    Z = CLIP-ViT(image).hidden_states[−2][:, 1:]         (B, N, d_v)   penultimate block, [CLS] dropped
    H = projector(Z)                                      (B, N, d)     linear (LLaVA-1) or
                                                                        Linear → GELU → Linear (LLaVA-1.5)
    input = [e(t_1) … e(t_{k−1}), H_1 … H_N, e(t_{k+1}) …]   the <image> token t_k replaced by N vectors

Liu et al., 2023, "Visual Instruction Tuning" (LLaVA-1: linear projector, CLIP ViT-L/14 at 224 px,
N = 256, Vicuna as the LLM) and Liu et al., 2024, "Improved Baselines with Visual Instruction Tuning"
(LLaVA-1.5: the two-layer MLP "mlp2x_gelu", ViT-L/14 at 336 px, N = 576). Training has two stages
(``STAGES``): feature alignment (only the projector learns, on captions) and visual instruction
tuning (projector and LLM, or LoRA on the LLM, on question–answer pairs); the vision tower stays
frozen throughout.

Unlike BLIP-2 there is no Q-Former: every patch becomes one LLM token. A row's single <image>
placeholder grows into N rows (the original code's IMAGE_TOKEN_INDEX); a row that already holds N
placeholders, as transformers' processor writes them, has them replaced in place. Both give the
same sequence. ``decode_embeds`` runs a nanomm decoder on embeddings, which is how any prefix of
non-token vectors (BLIP-2's queries too) reaches the LM; ``generate`` continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from nanomm.models.config import GPTConfig, LlamaConfig
from nanomm.models.gpt import GPT, DecoderLM
from nanomm.models.llama import Llama
from nanomm.models.multimodal_config import LlavaConfig
from nanomm.models.outputs import CausalLMOutput
from nanomm.models.vit import ViT
from nanomm.nn.attention import KVCache
from nanomm.nn.mlp import gelu

__all__ = ["Llava", "LinearProjector", "MLPProjector", "PROJECTORS", "STAGES", "SplicedInputs", "decode_embeds",
           "build_decoder", "splice_images", "set_stage"]

IGNORE_INDEX = -100

DECODERS: dict[type, Callable[..., DecoderLM]] = {GPTConfig: GPT, LlamaConfig: Llama}


def build_decoder(config: GPTConfig | LlamaConfig) -> DecoderLM:
    if type(config) not in DECODERS:
        raise TypeError(f"config: expected a GPTConfig or LlamaConfig, got {type(config).__name__}")
    return DECODERS[type(config)](config)


# ----------------------------------------------------------------------------- a decoder fed embeddings

def decode_embeds(lm: DecoderLM, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, past_key_values: KVCache | None = None,
                  use_cache: bool = False) -> CausalLMOutput:
    """The decoder fed (B, T, d) input embeddings (image tokens spliced in) instead of token ids."""
    return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
              past_key_values=past_key_values, use_cache=use_cache)


# ----------------------------------------------------------------------------- projectors

class LinearProjector(nn.Module):
    """LLaVA-1: H = W Z + b."""

    def __init__(self, vision_dim: int, dim: int):
        super().__init__()
        self.fc = nn.Linear(vision_dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(z)


class MLPProjector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: H = W₂ GELU(W₁ Z + b₁) + b₂ (both layers output the LLM width)."""

    def __init__(self, vision_dim: int, dim: int):
        super().__init__()
        self.fc_in = nn.Linear(vision_dim, dim)
        self.fc_out = nn.Linear(dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc_out(gelu(self.fc_in(z)))


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {"linear": LinearProjector, "mlp2x_gelu": MLPProjector}


# ----------------------------------------------------------------------------- splicing

@dataclass
class SplicedInputs:
    """The LM's input after the image features took the placeholders' place."""

    inputs_embeds: Tensor  # (B, T', d)
    attention_mask: Tensor | None  # (B, T')
    labels: Tensor | None  # (B, T'), IGNORE_INDEX on image rows


def _expand(row: Tensor, at: int, fill: Tensor, n: int) -> Tensor:
    """row (T,) with its entry ``at`` replaced by n copies of the scalar ``fill``: (T + n − 1,)."""
    return torch.cat([row[:at], fill.reshape(1).expand(n), row[at + 1:]])


def splice_images(input_ids: Tensor, text_embeds: Tensor, image_features: Tensor, image_token_id: int,
                  attention_mask: Tensor | None = None, labels: Tensor | None = None) -> SplicedInputs:
    """Put ``image_features`` (B, N, d) where ``input_ids`` (B, T) holds ``image_token_id``: once per row
    (expanded to N rows) or N times in a row (replaced in place)."""
    B, N, _ = image_features.shape
    rows_e, rows_m, rows_l = [], [], []
    for b in range(B):
        at = (input_ids[b] == image_token_id).nonzero().flatten()
        if len(at) == 1:
            k = int(at[0])
            rows_e.append(torch.cat([text_embeds[b, :k], image_features[b], text_embeds[b, k + 1:]]))
            if attention_mask is not None:
                rows_m.append(_expand(attention_mask[b], k, attention_mask[b, k], N))
            if labels is not None:
                rows_l.append(_expand(labels[b], k, labels.new_tensor(IGNORE_INDEX), N))
        elif len(at) == N and int(at[-1] - at[0]) == N - 1:
            e = text_embeds[b].clone()
            e[at] = image_features[b].to(e.dtype)
            rows_e.append(e)
            rows_m.append(attention_mask[b]) if attention_mask is not None else None
            rows_l.append(labels[b].masked_fill(input_ids[b] == image_token_id, IGNORE_INDEX)) \
                if labels is not None else None
        else:
            raise ValueError(f"input_ids: row {b} holds the image token {image_token_id} {len(at)} times; expected "
                             f"once (one image) or {N} consecutive times (the image's features, pre-expanded)")
    if len({r.shape[0] for r in rows_e}) != 1:
        raise ValueError("input_ids: rows expand to different lengths; put the same number of image tokens "
                         "(1 or N) in every row")
    return SplicedInputs(inputs_embeds=torch.stack(rows_e),
                         attention_mask=torch.stack(rows_m) if attention_mask is not None else None,
                         labels=torch.stack(rows_l) if labels is not None else None)


# ----------------------------------------------------------------------------- the model

class Llava(nn.Module):
    """Frozen ViT → projector → decoder LM (LLaMA in LLaVA; any nanomm decoder works)."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        if not isinstance(config, LlavaConfig):
            raise TypeError(f"config: expected a LlavaConfig, got {type(config).__name__}")
        c = self.config = config
        self.vision = ViT(c.vision)
        self.projector = PROJECTORS[c.projector](c.vision.dim, c.lm.dim)
        self.lm = build_decoder(c.lm)
        self.vision.requires_grad_(False)  # frozen in both stages
        set_stage(self, "pretrain")

    def train(self, mode: bool = True) -> "Llava":
        super().train(mode)
        self.vision.eval()  # a frozen tower keeps its inference behaviour (no dropout) while the rest trains
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed_tokens

    @property
    def n_image_tokens(self) -> int:
        """LM positions one image occupies."""
        return self.config.vision.n_patches + (self.config.feature_select == "full")

    def vision_states(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, d_v): the frozen tower's features at vision_feature_layer. A data pipeline
        may compute them once per image and pass ``vision_states`` instead of the pixels."""
        grad = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.vision.features(pixel_values, self.config.vision_feature_layer,
                                        drop_cls=self.config.feature_select == "patch")

    def image_features(self, pixel_values: Tensor | None = None, *, vision_states: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) or (B, N, d_v) precomputed states -> (B, N, d) image tokens in the LM's embedding space."""
        if (pixel_values is None) == (vision_states is None):
            raise ValueError("pixel_values, vision_states: expected exactly one of them")
        return self.projector(vision_states if vision_states is not None else self.vision_states(pixel_values))

    def splice(self, input_ids: Tensor, pixel_values: Tensor | None = None, attention_mask: Tensor | None = None,
               labels: Tensor | None = None, *, vision_states: Tensor | None = None) -> SplicedInputs:
        feats = self.image_features(pixel_values, vision_states=vision_states)  # (B, N, d)
        if feats.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values: expected one image per row of input_ids ({input_ids.shape[0]}), "
                             f"got {feats.shape[0]}")
        text = self.lm.embed_tokens(input_ids.masked_fill(input_ids == self.config.image_token_id, 0))
        return splice_images(input_ids, text, feats, self.config.image_token_id, attention_mask, labels)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                inputs_embeds: Tensor | None = None) -> CausalLMOutput:
        """Logits over the spliced sequence (B, T + N − 1, V) when ``pixel_values`` is given; otherwise the
        plain LM on ``input_ids`` or ``inputs_embeds`` (what ``generate`` calls after the prefix)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values: the image is spliced at <image> in input_ids; got inputs_embeds")
            s = self.splice(input_ids, pixel_values, attention_mask)
            inputs_embeds, attention_mask = s.inputs_embeds, s.attention_mask
        elif input_ids is not None:
            inputs_embeds = self.lm.embed_tokens(input_ids)
        return decode_embeds(self.lm, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)


# ----------------------------------------------------------------------------- training stages

def _projector_only(name: str) -> bool:
    return name.startswith("projector.")


def _projector_and_lm(name: str) -> bool:
    return name.startswith(("projector.", "lm."))


# stage -> which parameters learn: stage 1 aligns features, stage 2 tunes for instructions
STAGES: dict[str, Callable[[str], bool]] = {"pretrain": _projector_only, "finetune": _projector_and_lm}


def set_stage(model: Llava, stage: str) -> dict[str, int]:
    """Set requires_grad for ``stage``; returns {"trainable": n, "frozen": n} (tied tensors once). LoRA on
    the LLM instead of full tuning: set the "pretrain" stage, then ``nanomm.peft.apply(model.lm, ...)``."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {sorted(STAGES)}, got {stage!r}")
    rule = STAGES[stage]
    for name, p in model.named_parameters():
        p.requires_grad_(rule(name))
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


# ----------------------------------------------------------------------------- transformers' LLaVA

# checkpoint name prefixes as transformers 4.x hub files, 5.x modules and 5.x saves write them -> one form
_HF_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."))
_FEATURE_SELECT_IN = {"default": "patch", "full": "full"}


def _normalise(name: str) -> str:
    for old, new in _HF_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def _hf_rules(projector: str) -> list:
    from nanomm.models.hub_formats import LLAMA_RULES, Rule
    from nanomm.models.vit import CLIP_VISION_RULES

    proj = {"linear": {"linear_1": "fc"}, "mlp2x_gelu": {"linear_1": "fc_in", "linear_2": "fc_out"}}[projector]
    return [
        *[Rule(f"vision_tower.{r.hf}", tuple(f"vision.{o}" for o in r.ours)) for r in CLIP_VISION_RULES],
        *[Rule(f"multi_modal_projector.{hf}.{p}", (f"projector.{ours}.{p}",))
          for hf, ours in proj.items() for p in ("weight", "bias")],
        *[Rule(("language_model." if r.hf.startswith("lm_head") else "language_model.model.") + r.hf,
               tuple(f"lm.{o}" for o in r.ours)) for r in LLAMA_RULES],
    ]


def llava_config_from_hf(cfg: dict) -> LlavaConfig:
    """transformers' LlavaConfig (as a config.json dict) -> nanomm's; options nanomm lacks are refused."""
    from nanomm.models.clip import clip_config_in
    from nanomm.models.hub_formats import llama_config_in

    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise ValueError("config.json: nanomm's LLaVA projector is Linear-GELU-Linear with biases; got "
                         f"projector_hidden_act={cfg.get('projector_hidden_act')!r}, "
                         f"multimodal_projector_bias={cfg.get('multimodal_projector_bias')!r}")
    layer, select = cfg.get("vision_feature_layer", -2), cfg.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or select not in _FEATURE_SELECT_IN:
        raise ValueError(f"config.json: expected one int vision_feature_layer and a strategy in "
                         f"{sorted(_FEATURE_SELECT_IN)}, got {layer!r}, {select!r}")
    vision = clip_config_in({"vision_config": cfg["vision_config"]}).vision
    lm = llama_config_in(cfg["text_config"], set())
    return LlavaConfig(vision=vision, lm=lm, projector="mlp2x_gelu", vision_feature_layer=layer,
                       feature_select=_FEATURE_SELECT_IN[select],
                       image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)))


def llava_from_hf(path) -> Llava:  # noqa: ANN001 - a folder path
    """Load a transformers LlavaForConditionalGeneration folder (CLIP vision tower + LLaMA), strictly."""
    import json
    from pathlib import Path

    from nanomm.models.hub import map_in, our_weights, read_hf_weights
    from nanomm.models.hub_formats import Family

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: expected a folder with config.json, got {str(folder)!r}")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "llava":
        raise ValueError(f"config.json: expected model_type 'llava', got {cfg.get('model_type')!r}")
    config = llava_config_from_hf(cfg)
    model = Llava(config)
    family = Family("llava", "", (), _hf_rules(config.projector), None, None, ignore=(r".*position_ids$",))
    tensors = {_normalise(k): v for k, v in read_hf_weights(folder).items()}
    weights, _ = our_weights(model)
    with torch.no_grad():
        for name, value in map_in(family, tensors, model).items():
            weights[name].copy_(value)
    return model.eval()
