"""BLIP-2: a frozen image encoder and a frozen LLM, bridged by a Q-Former that alone learns (Li et al., 2023).

    I = LN(ViT(image))                       (B, 257, d_v)   frozen; LN is LAVIS's trainable ln_vision
    Q = QFormer(queries, I)                  (B, 32, 768)    the image in 32 vectors
    P = W Q + b                              (B, 32, d_lm)   a soft visual prompt
    p(text | image) = LM([P ; e(text)])                      frozen decoder

Two stages, both with the ViT frozen (``STAGES``):
  representation  ITC + ITM + ITG on the Q-Former alone (no LLM): the queries learn to extract the
                  visual features the text describes (nanomm.train.objectives_blip2)
  generative      the Q-Former's outputs, projected, prefix a frozen decoder LM trained on captions;
                  the LM's loss flows back through the projection into the Q-Former
The paper's "188M" is the Q-Former with its queries (nanomm.models.qformer.count_qformer_params);
stage 2 leaves out the Q-Former's text-only parts (word embeddings, text FFNs, LM head) and adds the
projection: ≈107M with OPT-2.7B.

``forward`` follows the decoder convention (``input_ids``/``inputs_embeds``, mask, cache), with the
visual prefix prepended when ``pixel_values`` is given, so ``nanomm.models.generation.generate``
captions from the prefix (``caption``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanomm.models.llava import build_decoder, decode_embeds, trainable_counts
from nanomm.models.multimodal_config import Blip2Config
from nanomm.models.outputs import CausalLMOutput
from nanomm.models.qformer import QFormer
from nanomm.models.vit import ViT
from nanomm.nn.attention import KVCache
from nanomm.nn.norm import LayerNorm

__all__ = ["Blip2", "STAGES", "set_stage", "trainable_counts"]


class Blip2(nn.Module):
    """ViT (frozen) → ln_vision → Q-Former → [ITC/ITM heads | projection → LM (frozen)]."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        if not isinstance(config, Blip2Config):
            raise TypeError(f"config: expected a Blip2Config, got {type(config).__name__}")
        c = self.config = config
        d = c.qformer.dim
        self.vision = ViT(c.vision)
        self.ln_vision = LayerNorm(c.vision.dim, eps=c.vision.layer_norm_eps)
        self.qformer = QFormer(c.qformer)
        # stage 1 heads: the ITC space and the match / no-match classifier
        self.vision_proj = nn.Linear(d, c.embed_dim)
        self.text_proj = nn.Linear(d, c.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.temp = nn.Parameter(torch.tensor(float(c.temperature)))  # τ itself, as LAVIS learns it
        # stage 2: queries into the LM's embedding space
        self.lm_proj = nn.Linear(d, c.lm.dim)
        self.lm = build_decoder(c.lm)
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_proj):
            nn.init.normal_(m.weight, std=c.qformer.init_std)
            nn.init.zeros_(m.bias)
        set_stage(self, "representation")

    def train(self, mode: bool = True) -> "Blip2":
        super().train(mode)
        self.vision.eval()  # frozen parts keep inference behaviour, as LAVIS's disabled_train
        self.lm.eval()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed_tokens

    # -------------------------------------------------------------- the image side
    def vision_states(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N + 1, d_v): the frozen ViT's chosen hidden state. Frozen, so a data pipeline
        may compute it once per image and pass it as ``vision_states`` instead of the pixels."""
        grad = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.vision.features(pixel_values, self.config.vision_feature_layer, drop_cls=False)

    def image_embeds(self, pixel_values: Tensor | None = None, *, vision_states: Tensor | None = None) -> Tensor:
        """ln_vision of the ViT state (B, N + 1, d_v), from pixels or from precomputed ``vision_states``."""
        if (pixel_values is None) == (vision_states is None):
            raise ValueError("pixel_values, vision_states: expected exactly one of them")
        return self.ln_vision(vision_states if vision_states is not None else self.vision_states(pixel_values))

    def query_output(self, image_embeds: Tensor) -> Tensor:
        """(B, N + 1, d_v) -> (B, N_q, d): the queries after reading the image (no text)."""
        return self.qformer(image_embeds).query_output

    def visual_prefix(self, pixel_values: Tensor | None = None, *, vision_states: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, N_q, d_lm): the soft prompt the LM reads."""
        return self.lm_proj(self.query_output(self.image_embeds(pixel_values, vision_states=vision_states)))

    # -------------------------------------------------------------- stage 1 features
    def image_feats(self, query_output: Tensor) -> Tensor:
        """(B, N_q, d) -> (B, N_q, e) L2-normalised: one ITC vector per query."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_feat(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) text, Q-Former in text-only mode -> (B, e) L2-normalised [CLS] vector."""
        text = self.qformer(None, input_ids, attention_mask).text_output  # (B, T, d)
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, 2) match / no-match logits: queries and text attend to each other, the head reads the
        queries and its outputs are averaged over them."""
        out = self.qformer(image_embeds, input_ids, attention_mask, mask="bidirectional")
        return self.itm_head(out.query_output).mean(dim=1)

    def similarity(self, image_feats: Tensor, text_feat: Tensor) -> Tensor:
        """(B_i, N_q, e), (B_t, e) -> (B_i, B_t) cosine of the best-matching query, max_q ⟨z_q, t⟩."""
        return torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1)

    # -------------------------------------------------------------- stage 2: the LM
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                inputs_embeds: Tensor | None = None, vision_states: Tensor | None = None) -> CausalLMOutput:
        """LM logits for [visual prefix ; text] (B, N_q + T, V) when ``pixel_values`` (or precomputed
        ``vision_states``) is given, else for the text alone (the decoding steps of ``generate``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
        embeds = self.lm.embed_tokens(input_ids) if input_ids is not None else inputs_embeds  # (B, T, d_lm)
        if pixel_values is not None or vision_states is not None:
            if past_key_values is not None:
                raise ValueError("pixel_values: the visual prefix comes first; got it with a non-empty cache")
            prefix = self.visual_prefix(pixel_values, vision_states=vision_states).to(embeds.dtype)  # (B, N_q, d_lm)
            if prefix.shape[0] != embeds.shape[0]:
                raise ValueError(f"pixel_values: expected {embeds.shape[0]} images like the text, "
                                 f"got {prefix.shape[0]}")
            embeds = torch.cat([prefix, embeds], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(prefix.shape[:2])
                attention_mask = torch.cat([ones, attention_mask], dim=1)
        return decode_embeds(self.lm, embeds, attention_mask, position_ids, past_key_values, use_cache)

    @torch.no_grad()
    def caption(self, pixel_values: Tensor | None, bos_token_id: int, eos_token_id: int, *, max_new_tokens: int = 16,
                vision_states: Tensor | None = None, **generate_kwargs) -> Tensor:
        """(B, n) new token ids continuing [visual prefix ; bos] (greedy unless told otherwise)."""
        from nanomm.models.generation import generate

        prefix = self.visual_prefix(pixel_values, vision_states=vision_states)  # (B, N_q, d_lm)
        bos = torch.full((prefix.shape[0], 1), bos_token_id, dtype=torch.long, device=prefix.device)
        embeds = torch.cat([prefix, self.lm.embed_tokens(bos)], dim=1)
        out = generate(self, inputs_embeds=embeds, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       **generate_kwargs)
        return out.new_tokens


# ----------------------------------------------------------------------------- training stages

_STAGE1 = ("qformer.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp")
# stage 2 reads only the queries' path through the Q-Former: text embeddings, text FFNs and the LM
# head get no gradient (LAVIS deletes them), the projection into the LM does
_TEXT_ONLY = ("qformer.embeddings.word.", "qformer.embeddings.position.", "qformer.lm_head.")


def _representation(name: str) -> bool:
    return name.startswith(_STAGE1)


def _generative(name: str) -> bool:
    if name.startswith(_TEXT_ONLY) or ".mlp_text." in name or ".norm_text." in name:
        return False
    return name.startswith(("qformer.", "ln_vision.", "lm_proj."))


STAGES: dict[str, Callable[[str], bool]] = {"representation": _representation, "generative": _generative}


def set_stage(model: Blip2, stage: str) -> dict[str, int]:
    """Make exactly the parameters of ``stage`` trainable; returns {"trainable": n, "frozen": n}."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {sorted(STAGES)}, got {stage!r}")
    rule = STAGES[stage]
    for name, p in model.named_parameters():
        p.requires_grad_(rule(name))
    return trainable_counts(model)
