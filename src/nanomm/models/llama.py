"""LLaMA: GPT's decoder with four changes that became the default of open LLMs (Touvron et al., 2023).

  RMSNorm     pre-norm with x / sqrt(mean(x²) + eps) · γ: no centring, no bias    (Zhang & Sennrich, 2019)
  SwiGLU      down(silu(gate x) ⊙ up x), inner width ≈ 8d/3 so 3 matrices cost what 2 did (Shazeer, 2020)
  RoPE        q and k rotated by their position; scores depend on i − j only       (Su et al., 2021)
  no biases   in any linear layer; the output head is not tied to the embedding

LLaMA-2 70B and most later models add grouped-query attention (Ainslie et al., 2023): n_kv_head < n_head
key/value heads, each shared by n_head / n_kv_head query heads, which shrinks the KV cache by that
factor. RoPE uses the half-split pairing (i, i + D/2) of Hugging Face's checkpoints, so their q/k
weights load unpermuted; Meta's original files pair (2i, 2i+1) and need ``permute_qk_weight``.

The forward pass (cache, padding, positions) is ``DecoderLM``'s, shared with GPT.
"""

from __future__ import annotations

from torch import nn

from nanomm.models.config import LlamaConfig
from nanomm.models.gpt import DecoderLM, Positions
from nanomm.nn.block import Block
from nanomm.nn.norm import RMSNorm
from nanomm.nn.position import LearnedPositionalEmbedding

__all__ = ["Llama"]


class Llama(DecoderLM):
    """LLaMA from a LlamaConfig."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config: expected a LlamaConfig, got {type(config).__name__}")
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.positions = Positions(c)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.n_head, c.ff_dim, n_kv_head=c.n_kv_head, norm="rms", ffn="swiglu", placement="pre",
                  bias=False, eps=c.rms_norm_eps, dropout=c.dropout, backend=c.backend)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(self._init)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
