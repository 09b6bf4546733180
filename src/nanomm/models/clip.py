"""CLIP: an image tower and a text tower trained to agree (Radford et al., 2021, "Learning Transferable
Visual Models From Natural Language Supervision").

    u_i = normalize(W_img · ViT(image_i)[CLS])        v_j = normalize(W_txt · Text(text_j)[EOS])
    logits_ij = s · ⟨u_i, v_j⟩,   s = min(e^t, 100),  t learnable, t_0 = log(1/0.07)
    L = ½ [CE(logits, diag) + CE(logitsᵀ, diag)]      symmetric InfoNCE (nanomm.nn.losses.clip_loss)

The similarity is the cosine (both embeddings L2-normalised) and τ = 1/s is learned in log space;
clipping s at 100 (§2.5) keeps the softmax from collapsing onto one column. The text tower is a causal
pre-LN transformer whose final LayerNorm'd state at the end-of-text token is the sentence feature.

Zero-shot classification (§3.1.2) turns class names into sentences ("a photo of a {}."), averages the
normalised text embeddings of several templates per class (prompt ensembling, §3.1.4), and picks the
class whose embedding has the largest cosine with the image. Retrieval ranks one side by cosine with
the other and reports recall@k.

HF interop: ``clip_from_hf(dir)`` loads a transformers ``CLIPModel`` folder with a strict name table
(the one ``nanomm.models.hub`` uses for BERT/GPT/LLaMA); ``clip_to_hf(model, dir)`` writes one back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from nanomm.io import write_json, write_safetensors
from nanomm.models.gpt import check_input_ids
from nanomm.models.hub import map_in, our_weights, read_hf_weights
from nanomm.models.hub_formats import Family, Rule
from nanomm.models.outputs import BaseModelOutput
from nanomm.models.vision_config import CLIPConfig, CLIPTextConfig, ViTConfig
from nanomm.models.vit import CLIP_VISION_RULES, ViT, block_rules, make_block
from nanomm.nn.losses import CLIP_MAX_SCALE
from nanomm.nn.norm import LayerNorm
from nanomm.nn.position import LearnedPositionalEmbedding

__all__ = ["CLIP", "CLIPTextEncoder", "CLIPOutput", "clip_from_hf", "clip_to_hf", "CLIP_RULES",
           "zero_shot_weights", "zero_shot_probs", "retrieval_recall", "PROMPT_TEMPLATES"]


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------- text tower

# which position holds the sentence feature; "argmax" is OpenAI's rule (EOS has the largest id)
_POOLING = {
    "eos": lambda ids, eos: (ids == eos).int().argmax(-1),  # the first EOS of each row
    "argmax": lambda ids, eos: ids.argmax(-1),
}


class CLIPTextEncoder(nn.Module):
    """Token + learned position embeddings → causal pre-LN blocks → LayerNorm; pooled at EOS."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if not isinstance(config, CLIPTextConfig):
            raise TypeError(f"config: expected a CLIPTextConfig, got {type(config).__name__}")
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.positions = LearnedPositionalEmbedding(c.max_positions, c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(make_block(c.dim, c.n_head, c.ff_dim, activation=c.activation,
                                               eps=c.layer_norm_eps, dropout=c.dropout, backend=c.backend)
                                    for _ in range(c.n_layer))
        self.final_norm = LayerNorm(c.dim, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool = False) -> BaseModelOutput:
        B, T = check_input_ids(input_ids)
        c = self.config
        if T > c.max_positions:
            raise ValueError(f"input_ids: expected at most max_positions={c.max_positions} tokens, got T={T}")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask: expected shape {(B, T)} like input_ids, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are never seen
        if c.pooling == "eos" and not input_ids.is_meta and not bool((input_ids == c.eos_token_id).any(-1).all()):
            raise ValueError(f"input_ids: every row must contain eos_token_id={c.eos_token_id}, the pooled position")
        x = self.drop(self.embed_tokens(input_ids) + self.positions.weight[:T])  # (B, T, d)
        hidden = [x]
        for block in self.blocks:
            x = block(x, attn_mask=mask, causal=True)  # causal: the EOS state summarises the whole text
            hidden.append(x)
        x = self.final_norm(x)
        at = _POOLING[c.pooling](input_ids, c.eos_token_id)  # (B,)
        pooled = x[torch.arange(B, device=x.device), at]  # (B, d)
        return BaseModelOutput(last_hidden_state=x, pooler_output=pooled,
                               hidden_states=tuple(hidden) if output_hidden_states else None)


# ----------------------------------------------------------------------------- CLIP

@dataclass
class CLIPOutput:
    """Scaled cosine logits both ways and the L2-normalised embeddings, with transformers' field names."""

    logits_per_image: Tensor  # (B_img, B_txt)
    logits_per_text: Tensor  # (B_txt, B_img)
    image_embeds: Tensor  # (B_img, P), unit norm
    text_embeds: Tensor  # (B_txt, P), unit norm


class CLIP(nn.Module):
    """Two towers, two bias-free projections into one P-dimensional space, and a learned temperature."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config: expected a CLIPConfig, got {type(config).__name__}")
        c = self.config = config
        self.vision = ViT(c.vision)
        self.text = CLIPTextEncoder(c.text)
        self.visual_projection = nn.Linear(c.vision.dim, c.projection_dim, bias=False)
        self.text_projection = nn.Linear(c.text.dim, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))  # log(1/τ)
        self._init_text()

    @torch.no_grad()
    def _init_text(self) -> None:
        std = self.config.text.init_std
        for m in self.text.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text.embed_tokens.weight, std=std)
        nn.init.normal_(self.text.positions.weight, std=0.01)  # CLIP's position init
        nn.init.normal_(self.visual_projection.weight, std=self.config.vision.dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=self.config.text.dim ** -0.5)

    @property
    def scale(self) -> Tensor:
        """s = e^t clipped at 100, the factor in front of the cosines."""
        return self.logit_scale.exp().clamp(max=CLIP_MAX_SCALE)

    def encode_image(self, pixel_values: Tensor, *, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) → (B, P) image embeddings."""
        emb = self.visual_projection(self.vision(pixel_values).pooler_output)
        return _normalize(emb) if normalize else emb

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    normalize: bool = True) -> Tensor:
        """(B, T) ids → (B, P) text embeddings."""
        emb = self.text_projection(self.text(input_ids, attention_mask).pooler_output)
        return _normalize(emb) if normalize else emb

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> CLIPOutput:
        img = self.encode_image(pixel_values)
        txt = self.encode_text(input_ids, attention_mask)
        logits = self.scale * img @ txt.T  # (B_img, B_txt)
        return CLIPOutput(logits_per_image=logits, logits_per_text=logits.T, image_embeds=img, text_embeds=txt)


# ----------------------------------------------------------------------------- zero-shot and retrieval

PROMPT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


class BatchEncoder(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> dict[str, Tensor]: ...


@torch.no_grad()
def zero_shot_weights(model: CLIP, tokenizer: BatchEncoder, classnames: Sequence[str],
                      templates: Sequence[str | Callable[[str], str]] = PROMPT_TEMPLATES) -> Tensor:
    """(C, P) class embeddings: each class's template sentences embedded, averaged, renormalised."""
    if isinstance(classnames, str) or not classnames or not all(isinstance(n, str) and n for n in classnames):
        raise ValueError(f"classnames: expected a non-empty sequence of non-empty strings, got {classnames!r}")
    if isinstance(templates, str) or not templates or not all(callable(t) or "{}" in t for t in templates):
        raise ValueError(f"templates: expected a non-empty sequence of strings holding '{{}}' (or callables "
                         f"name -> sentence), got {templates!r}")
    sentences = [t(name) if callable(t) else t.format(name) for name in classnames for t in templates]
    batch = tokenizer.encode_batch(sentences)
    device = model.logit_scale.device
    emb = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (C·K, P)
    return _normalize(emb.view(len(classnames), len(templates), -1).mean(1))  # (C, P)


@torch.no_grad()
def zero_shot_probs(model: CLIP, pixel_values: Tensor, class_weights: Tensor) -> Tensor:
    """(B, C) probabilities softmax(s · cos(image, class)) for images (B, 3, H, W)."""
    if class_weights.dim() != 2 or class_weights.shape[1] != model.config.projection_dim:
        raise ValueError(f"class_weights: expected (C, {model.config.projection_dim}), "
                         f"got {tuple(class_weights.shape)}")
    img = model.encode_image(pixel_values)  # (B, P)
    return (model.scale * img @ class_weights.T).softmax(-1)


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, ks: Sequence[int] = (1, 5), *,
                     image_labels: Tensor | None = None, text_labels: Tensor | None = None) -> dict[str, float]:
    """Recall@k both ways for aligned pairs (image i ↔ text i).

    Without labels a hit is the paired item itself; with labels (B,) any item of the same label counts,
    which is fair when several captions are identical. Keys: "i2t_R@k", "t2i_R@k".
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"text_emb: expected the shape of image_emb {tuple(image_emb.shape)}, "
                         f"got {tuple(text_emb.shape)}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    n = image_emb.shape[0]
    img_l = torch.arange(n) if image_labels is None else image_labels.cpu()
    txt_l = torch.arange(n) if text_labels is None else text_labels.cpu()
    if img_l.shape != (n,) or txt_l.shape != (n,):
        raise ValueError(f"image_labels, text_labels: expected shape ({n},), got {tuple(img_l.shape)}, "
                         f"{tuple(txt_l.shape)}")
    sim = (_normalize(image_emb.float()) @ _normalize(text_emb.float()).T).cpu()  # (N, N)
    out = {}
    for name, s, query_l, item_l in (("i2t", sim, img_l, txt_l), ("t2i", sim.T, txt_l, img_l)):
        order = s.argsort(dim=1, descending=True)  # (N, N) ranked items per query
        hit = item_l[order] == query_l[:, None]  # (N, N)
        for k in ks:
            out[f"{name}_R@{k}"] = float(hit[:, :k].any(1).float().mean())
    return out


# ----------------------------------------------------------------------------- HF interop

CLIP_RULES: list[Rule] = [
    *[Rule(f"vision_model.{r.hf}", tuple(f"vision.{o}" for o in r.ours)) for r in CLIP_VISION_RULES],
    Rule("text_model.embeddings.token_embedding.weight", ("text.embed_tokens.weight",)),
    Rule("text_model.embeddings.position_embedding.weight", ("text.positions.weight",)),
    *block_rules("text_model.encoder.layers", "text.blocks"),
    *[Rule(f"text_model.final_layer_norm.{p}", (f"text.final_norm.{p}",)) for p in ("weight", "bias")],
    Rule("visual_projection.weight", ("visual_projection.weight",)),
    Rule("text_projection.weight", ("text_projection.weight",)),
    Rule("logit_scale", ("logit_scale",)),
]

_ACT_IN = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "relu": "relu"}
_ACT_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _act(cfg: dict) -> str:
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _ACT_IN:
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (expected one of {sorted(_ACT_IN)})")
    return _ACT_IN[act]


def clip_config_in(cfg: dict, names: set[str] | None = None) -> CLIPConfig:
    v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    vision = ViTConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), channels=v.get("num_channels", 3),
        n_layer=v.get("num_hidden_layers", 12), n_head=v.get("num_attention_heads", 12),
        dim=v.get("hidden_size", 768), ff_dim=v.get("intermediate_size", 3072), activation=_act(v),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), init_std=v.get("initializer_range", 0.02))
    eos, vocab = t.get("eos_token_id", 49407), t.get("vocab_size", 49408)
    if not 0 <= eos < vocab:
        raise ValueError(f"config.json: text_config.eos_token_id={eos} is outside the vocabulary of {vocab}; "
                         "the pooled end-of-text position could never be found")
    pad = t.get("pad_token_id", 1)
    text = CLIPTextConfig(
        vocab_size=vocab, max_positions=t.get("max_position_embeddings", 77),
        n_layer=t.get("num_hidden_layers", 12), n_head=t.get("num_attention_heads", 8),
        dim=t.get("hidden_size", 512), ff_dim=t.get("intermediate_size", 2048), activation=_act(t),
        layer_norm_eps=t.get("layer_norm_eps", 1e-5), init_std=t.get("initializer_range", 0.02),
        # transformers keeps OpenAI's argmax rule for configs written before eos_token_id was fixed (= 2)
        eos_token_id=eos, pad_token_id=pad if pad is not None and 0 <= pad < vocab else 0,
        pooling="argmax" if eos == 2 else "eos")
    return CLIPConfig(vision=vision, text=text, projection_dim=cfg.get("projection_dim", 512),
                      logit_scale_init=cfg.get("logit_scale_init_value", 2.6592))


def _clip_config_out(c: CLIPConfig) -> dict[str, Any]:
    v, t = c.vision, c.text
    layout = dict(pre_norm=True, final_norm="cls", patch_bias=False)
    wrong = {k: getattr(v, k) for k, want in layout.items() if getattr(v, k) != want}
    if wrong:
        raise ValueError(f"model: transformers' CLIPVisionModel needs {layout}; this vision tower has {wrong}")
    if (t.pooling == "argmax") != (t.eos_token_id == 2):
        raise ValueError(f"model: transformers pools with argmax exactly when eos_token_id == 2; this text tower "
                         f"has pooling={t.pooling!r}, eos_token_id={t.eos_token_id}")
    return {
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": c.projection_dim,
        "logit_scale_init_value": c.logit_scale_init,
        "vision_config": dict(model_type="clip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                              num_channels=v.channels, num_hidden_layers=v.n_layer, num_attention_heads=v.n_head,
                              hidden_size=v.dim, intermediate_size=v.ff_dim, hidden_act=_ACT_OUT[v.activation],
                              layer_norm_eps=v.layer_norm_eps, initializer_range=v.init_std),
        "text_config": dict(model_type="clip_text_model", vocab_size=t.vocab_size,
                            max_position_embeddings=t.max_positions, num_hidden_layers=t.n_layer,
                            num_attention_heads=t.n_head, hidden_size=t.dim, intermediate_size=t.ff_dim,
                            hidden_act=_ACT_OUT[t.activation], layer_norm_eps=t.layer_norm_eps,
                            eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, bos_token_id=None,
                            initializer_range=t.init_std),
    }


CLIP_FAMILY = Family("clip", "", (), CLIP_RULES, clip_config_in, _clip_config_out,
                     ignore=(r".*position_ids$",))


def clip_from_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> CLIP:
    """Load a transformers ``CLIPModel`` folder (config.json + safetensors); strict: every tensor must map."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: expected a folder with config.json, got {str(folder)!r}")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "clip":
        raise ValueError(f"config.json: expected model_type 'clip', got {cfg.get('model_type')!r}")
    with torch.device(device):
        model = CLIP(clip_config_in(cfg))
    weights, _ = our_weights(model)
    with torch.no_grad():
        for name, value in map_in(CLIP_FAMILY, read_hf_weights(folder), model).items():
            weights[name].copy_(value)
    return model.to(dtype).eval()


def clip_to_hf(model: CLIP, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a transformers ``CLIPModel`` folder, atomically; ``extra`` keys join config.json
    (transformers keeps unknown keys as attributes)."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model: expected a nanomm CLIP, got {type(model).__name__}")
    cfg = {**_clip_config_out(model.config), **(extra or {})}
    weights, _ = our_weights(model)
    layers = {"vision.": model.config.vision.n_layer, "text.": model.config.text.n_layer}
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in CLIP_RULES:
        n = next((v for k, v in layers.items() if rule.ours[0].startswith(k)), 1)
        for i in (range(n) if "{i}" in rule.hf else [None]):
            name = rule.ours[0].format(i=i)
            if name in weights:  # a bias the model was built without (patch_bias=False)
                out[rule.hf.format(i=i)] = weights[name].detach().cpu()
                used.add(name)
    left = sorted(set(weights) - used)
    if left:
        raise ValueError(f"model: weights with no transformers name: {left}")
    folder = Path(path)
    write_safetensors(folder / "model.safetensors", out, metadata={"format": "pt"})
    write_json(folder / "config.json", cfg)
    return folder
