"""ViT: an image is a sequence of patches (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

    x_p = Conv_{P×P, stride P}(image)            (B, d, H/P, W/P) → (B, N, d),  N = (H/P)·(W/P)
    h_0 = [x_cls; x_p] + E_pos                   one learned vector per position, N + 1 of them
    h_0 ← LN_pre(h_0)                            CLIP only ("ln_pre", Radford et al., 2021)
    h_l = pre-LN block(h_{l−1}),  l = 1..L        x = x + Attn(LN(x));  x = x + MLP(LN(x))
    pooled = LN_post(h_L[CLS])                   CLIP ("cls"); ViT and EVA normalise every token ("all")

A P×P convolution with stride P is exactly a linear map applied to each flattened patch; the conv is
simply the fast way to cut and project in one call. At 224 px with P = 14 there are 16² = 256 patches,
257 tokens with [CLS]: what BLIP-2's Q-Former and LLaVA's projector receive.

``hidden_states`` are the input of the first block (after LN_pre) and the output of every block,
L + 1 tensors of (B, N + 1, d), as in transformers' CLIPVisionModel; LLaVA reads hidden_states[−2],
the penultimate block, without [CLS] (``features(pixels, layer=-2)``).

The HF names of a CLIP vision tower are in ``CLIP_VISION_RULES`` (relative to ``vision_model.``), so
CLIP, LLaVA and BLIP-2 loaders can map their vision weights with one table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nanomm.models.hub_formats import Rule
from nanomm.models.outputs import BaseModelOutput
from nanomm.models.vision_config import ViTConfig
from nanomm.nn.block import Block
from nanomm.nn.norm import LayerNorm
from nanomm.nn.position import LearnedPositionalEmbedding

__all__ = ["ViT", "PatchEmbedding", "make_block", "CLIP_VISION_RULES", "block_rules",
           "check_pixels"]


def make_block(dim: int, n_head: int, ff_dim: int, *, activation: str, eps: float, dropout: float,
               backend: str) -> Block:
    """A pre-LN transformer block with LayerNorms, biases and a two-matrix MLP (CLIP's layer)."""
    return Block(dim, n_head, ff_dim, norm="layer", ffn=activation, placement="pre", bias=True, eps=eps,
                 dropout=dropout, backend=backend)


def check_pixels(pixel_values: Tensor, channels: int, image_size: int) -> None:
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values: expected a torch.Tensor (B, C, H, W), got {type(pixel_values).__name__}")
    want = (channels, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want or not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values: expected a float tensor (B, {channels}, {image_size}, {image_size}), "
                         f"got {pixel_values.dtype} {tuple(pixel_values.shape)}")


class PatchEmbedding(nn.Module):
    """Cut the image into P×P patches and project each to d: one strided convolution."""

    def __init__(self, channels: int, dim: int, patch_size: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.proj(pixel_values.to(self.proj.weight.dtype))  # (B, d, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, d), patches in row-major order


class ViT(nn.Module):
    """Vision Transformer from a ViTConfig; ``forward`` returns a BaseModelOutput whose
    ``pooler_output`` is the normalised [CLS] state (B, d)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config: expected a ViTConfig, got {type(config).__name__}")
        c = self.config = config
        self.patch_embed = PatchEmbedding(c.channels, c.dim, c.patch_size, c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(c.dim))
        self.positions = LearnedPositionalEmbedding(c.n_tokens, c.dim)
        self.pre_norm = LayerNorm(c.dim, eps=c.layer_norm_eps) if c.pre_norm else nn.Identity()
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(make_block(c.dim, c.n_head, c.ff_dim, activation=c.activation,
                                               eps=c.layer_norm_eps, dropout=c.dropout, backend=c.backend)
                                    for _ in range(c.n_layer))
        self.post_norm = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=c.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.positions.weight, std=c.init_std)
        nn.init.normal_(self.cls_token, std=c.dim ** -0.5)  # CLIP's scale for the class embedding
        for block in self.blocks:  # residual projections shrink with depth, as in GPT-2
            for w in (block.attn.o_proj.weight, block.mlp.fc_out.weight):
                nn.init.normal_(w, std=c.init_std / math.sqrt(2 * c.n_layer))

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def embed(self, pixel_values: Tensor) -> Tensor:
        """pixels (B, C, H, W) → the first block's input (B, N + 1, d)."""
        c = self.config
        check_pixels(pixel_values, c.channels, c.image_size)
        patches = self.patch_embed(pixel_values)  # (B, N, d)
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, d)
        x = torch.cat([cls, patches], dim=1) + self.positions.weight.to(patches.dtype)  # (B, N + 1, d)
        return self.pre_norm(self.drop(x))

    def _layer_index(self, layer: int) -> int:
        n = self.config.n_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise ValueError(f"layer: expected an int in [-{n + 1}, {n}] (0 = embeddings, {n} = last block), "
                             f"got {layer!r}")
        return layer % (n + 1)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        x = self.embed(pixel_values)
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        if self.config.final_norm == "all":
            x = self.post_norm(x)
            pooled = x[:, 0]
        else:
            pooled = self.post_norm(x[:, 0])  # (B, d)
        return BaseModelOutput(last_hidden_state=x, pooler_output=pooled,
                               hidden_states=tuple(hidden) if output_hidden_states else None)

    def features(self, pixel_values: Tensor, layer: int = -2, *, drop_cls: bool = True) -> Tensor:
        """hidden_states[layer] without running the blocks after it: (B, N, d), or (B, N + 1, d) with
        ``drop_cls=False``. layer=-2 is the penultimate block, LLaVA's default."""
        upto = self._layer_index(layer)
        x = self.embed(pixel_values)
        for block in self.blocks[:upto]:
            x = block(x)
        return x[:, 1:] if drop_cls else x


# ----------------------------------------------------------------------------- HF names

def block_rules(hf: str, ours: str) -> list[Rule]:
    """Rules of one stack of CLIP encoder layers: ``hf`` and ``ours`` are the prefixes before ``{i}``."""
    pairs = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.out_proj": "attn.o_proj", "layer_norm1": "norm1", "layer_norm2": "norm2",
             "mlp.fc1": "mlp.fc_in", "mlp.fc2": "mlp.fc_out"}
    return [Rule(f"{hf}.{{i}}.{h}.{p}", (f"{ours}.{{i}}.{o}.{p}",))
            for h, o in pairs.items() for p in ("weight", "bias")]


def _wb(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.{p}", (f"{ours}.{p}",)) for p in ("weight", "bias")]


# transformers' CLIPVisionTransformer (names after "vision_model.") <-> nanomm's ViT
CLIP_VISION_RULES: list[Rule] = [
    Rule("embeddings.class_embedding", ("cls_token",)),
    Rule("embeddings.patch_embedding.weight", ("patch_embed.proj.weight",)),
    Rule("embeddings.patch_embedding.bias", ("patch_embed.proj.bias",)),
    Rule("embeddings.position_embedding.weight", ("positions.weight",)),
    *_wb("pre_layrnorm", "pre_norm"),  # sic: transformers spells it "layrnorm"
    *block_rules("encoder.layers", "blocks"),
    *_wb("post_layernorm", "post_norm"),
]
