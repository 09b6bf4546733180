"""GPT: a decoder-only transformer that predicts the next token.

    h_0 = W_e[x] + pos;   h_l = Block_l(h_{l−1}) with causal self-attention;   p(x_{t+1}) = softmax(h_L W_eᵀ)

GPT-1 (Radford et al., 2018) puts the LayerNorm after each residual sum (post-LN) and has no final
norm; GPT-2 (Radford et al., 2019) moves it in front of each sublayer (pre-LN) and adds a final
LayerNorm; GPT-3 (Brown et al., 2020) keeps GPT-2's layout at 96 × 12288. All three tie the output
head to the token embedding (Press & Wolf, 2017).

The position encoding is a table lookup (``POSITION_ENCODINGS``): learned or sinusoidal vectors are
added to the input, ALiBi slopes and RoPE act inside attention. ``DecoderLM`` is the forward pass
every decoder here shares (LLaMA too), including the KV cache and left padding:

    model(input_ids (B, T), attention_mask (B, T_past + T) 1 = keep, position_ids (B, T),
          past_key_values: KVCache, use_cache) -> CausalLMOutput(logits (B, T, V), past_key_values)

Without explicit position_ids they come from the mask, cumsum − 1, so a row padded on the left
starts its real tokens at position 0 (what the same prompt unpadded would see).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from nanomm.models.config import GPTConfig, LlamaConfig
from nanomm.models.outputs import CausalLMOutput
from nanomm.nn.attention import KVCache
from nanomm.nn.block import Block
from nanomm.nn.norm import LayerNorm
from nanomm.nn.position import (LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEmbedding,
                                alibi_slopes)

__all__ = ["GPT", "DecoderLM", "Positions", "POSITION_ENCODINGS", "check_input_ids"]


# ----------------------------------------------------------------------------- position encodings

def _learned(c) -> dict[str, Any]:
    return {"wpe": LearnedPositionalEmbedding(c.max_positions, c.dim)}


def _sinusoidal(c) -> dict[str, Any]:
    return {"wpe": SinusoidalPositionalEmbedding(c.max_positions, c.dim)}


def _alibi(c) -> dict[str, Any]:
    return {"slopes": alibi_slopes(c.n_head)}


def _rope(c) -> dict[str, Any]:
    return {"rotary": RotaryEmbedding(c.head_dim, base=c.rope_base, layout="half", max_positions=c.max_positions)}


POSITION_ENCODINGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "learned": _learned, "sinusoidal": _sinusoidal, "alibi": _alibi, "rope": _rope,
}


class Positions(nn.Module):
    """The decoder's position encoding: what it adds to the input, what it passes to attention."""

    def __init__(self, config: GPTConfig | LlamaConfig):
        super().__init__()
        self.kind = config.position
        for name, part in POSITION_ENCODINGS[config.position](config).items():
            if isinstance(part, Tensor):
                self.register_buffer(name, part, persistent=False)  # ALiBi slopes are a formula
            else:
                setattr(self, name, part)

    def embed(self, position_ids: Tensor) -> Tensor | float:
        return self.wpe(position_ids) if hasattr(self, "wpe") else 0.0  # (B, T, d) or (T, d)

    def attention_kwargs(self, position_ids: Tensor) -> dict[str, Any]:
        if hasattr(self, "rotary"):
            return {"rotary": self.rotary, "position_ids": position_ids}
        if hasattr(self, "slopes"):
            # ALiBi depends on i − j only, which left padding does not change
            return {"alibi_slopes": self.slopes}
        return {}


# ----------------------------------------------------------------------------- the shared forward

def check_input_ids(input_ids: Tensor) -> tuple[int, int]:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor (B, T), got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected integer ids of shape (B, T), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    return input_ids.shape[0], input_ids.shape[1]


def _mask_and_positions(attention_mask: Tensor | None, position_ids: Tensor | None, B: int, T: int,
                        past: int, device: torch.device) -> tuple[Tensor | None, Tensor]:
    if attention_mask is None:
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)  # (T,), the same for every row
        return None, position_ids
    if tuple(attention_mask.shape) != (B, past + T):
        raise ValueError(f"attention_mask: expected (B, T_past + T) = ({B}, {past + T}) covering the cached "
                         f"and the new tokens, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if position_ids is None:
        # count real tokens only; pads get position 0, they are masked out anyway
        position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    return keep[:, None, None, :], position_ids  # (B, 1, 1, T_past + T)


class DecoderLM(nn.Module):
    """Token embedding → positions → blocks → final norm → head. Subclasses build the parts:
    embed_tokens, positions, drop, blocks, norm, lm_head."""

    embed_tokens: nn.Embedding
    positions: Positions
    drop: nn.Module
    blocks: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, inputs_embeds: Tensor | None = None) -> CausalLMOutput:
        """``inputs_embeds`` (B, T, d) replaces the token embedding: how BLIP-2 and LLaVA feed image tokens."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them, got "
                             + ("both" if input_ids is not None else "neither"))
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.embed_tokens.embedding_dim:
                raise ValueError(f"inputs_embeds: expected (B, T, {self.embed_tokens.embedding_dim}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            (B, T), device, tokens = inputs_embeds.shape[:2], inputs_embeds.device, inputs_embeds
        else:
            (B, T), device = check_input_ids(input_ids), input_ids.device
            tokens = self.embed_tokens(input_ids)
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise TypeError(f"past_key_values: expected a nanomm KVCache, got {type(past_key_values).__name__}")
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.length if cache is not None else 0
        attn_mask, position_ids = _mask_and_positions(attention_mask, position_ids, B, T, past, device)
        x = self.drop(tokens + self.positions.embed(position_ids))  # (B, T, d)
        extra = self.positions.attention_kwargs(position_ids)
        # one new token sees every cached key anyway: skipping the causal mask lets sdpa take its fast path
        causal = T > 1
        hidden = []
        for i, block in enumerate(self.blocks):
            hidden.append(x)
            x = block(x, attn_mask=attn_mask, causal=causal, cache=cache, layer_idx=i, **extra)
        x = self.norm(x)
        hidden.append(x)  # as in transformers: the last entry is after the final norm
        return CausalLMOutput(logits=self.lm_head(x), past_key_values=cache, last_hidden_state=x,
                              hidden_states=tuple(hidden) if output_hidden_states else None)


# ----------------------------------------------------------------------------- GPT

class GPT(DecoderLM):
    """GPT-1/2/3 from a GPTConfig: LayerNorm blocks with GELU MLPs and biases, tied head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.positions = Positions(c)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.n_head, c.ff_dim, norm="layer", ffn=c.activation, placement=c.norm_placement,
                  bias=c.bias, eps=c.layer_norm_eps, dropout=c.dropout, backend=c.backend)
            for _ in range(c.n_layer))
        self.norm = LayerNorm(c.dim, eps=c.layer_norm_eps, bias=c.bias) if c.final_norm else nn.Identity()
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "mlp.fc_out.weight")):
                # GPT-2 §2.3: residual projections scaled by 1/sqrt(N) so the stream's variance
                # does not grow with depth; N = 2 residual additions per block
                nn.init.normal_(p, std=c.init_std / math.sqrt(2 * c.n_layer))
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
