"""The transformer block: attention and feed-forward sublayers, each inside a residual, norm pre or post.

  post-LN  x = Norm(x + Sublayer(x))     Vaswani et al. (2017); BERT, GPT-1
  pre-LN   x = x + Sublayer(Norm(x))     GPT-2, GPT-3, LLaMA; trains stably without warm-up
                                         (Xiong et al., 2020, "On Layer Normalization in the Transformer")

Pre-LN leaves the residual stream un-normalised, so a pre-LN stack needs one final norm after the
last block; post-LN already ends normalised. An optional cross-attention sublayer sits between the
two (Q-Former's BERT layers, encoder-decoder decoders). Norm, feed-forward and placement are picked
from the tables below by name.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from nanomm.nn.attention import KVCache, MultiHeadAttention
from nanomm.nn.mlp import ACTIVATIONS, MLP, SwiGLU
from nanomm.nn.norm import LayerNorm, RMSNorm

__all__ = ["Block", "NORMS", "FEEDFORWARDS", "PLACEMENTS"]

NORMS: dict[str, Callable[[int, float, bool], nn.Module]] = {
    "layer": lambda dim, eps, bias: LayerNorm(dim, eps=eps, bias=bias),
    "rms": lambda dim, eps, bias: RMSNorm(dim, eps=eps),  # RMSNorm has no bias by definition
}

# "swiglu" is LLaMA's gated MLP; any activation name gives the two-matrix MLP with that activation
FEEDFORWARDS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "swiglu": lambda dim, hidden, bias: SwiGLU(dim, hidden, bias=bias),
    **{act: (lambda dim, hidden, bias, act=act: MLP(dim, hidden, activation=act, bias=bias))
       for act in ACTIVATIONS},
}

# how a sublayer f and its norm wrap the residual stream x
PLACEMENTS: dict[str, Callable[[Tensor, Callable[[Tensor], Tensor], nn.Module, nn.Module], Tensor]] = {
    "pre": lambda x, f, norm, drop: x + drop(f(norm(x))),
    "post": lambda x, f, norm, drop: norm(x + drop(f(x))),
}


def _pick(name: str, value: str, table: dict) -> None:
    if value not in table:
        raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")


class Block(nn.Module):
    """Self-attention (+ optional cross-attention) and a feed-forward network, with residuals.

    Submodules: attn, norm1, [cross_attn, norm_cross,] mlp, norm2. Dropout is applied to each
    sublayer's output before it joins the residual stream.
    """

    def __init__(self, dim: int, n_head: int, ff_dim: int, *, n_kv_head: int | None = None,
                 norm: str = "layer", ffn: str = "gelu", placement: str = "pre", bias: bool = True,
                 eps: float = 1e-5, dropout: float = 0.0, cross_dim: int | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        _pick("norm", norm, NORMS)
        _pick("ffn", ffn, FEEDFORWARDS)
        _pick("placement", placement, PLACEMENTS)
        self.placement = placement
        self.attn = MultiHeadAttention(dim, n_head, n_kv_head, bias=bias, backend=backend)
        self.norm1 = NORMS[norm](dim, eps, bias)
        if cross_dim is not None:
            self.cross_attn = MultiHeadAttention(dim, n_head, bias=bias, kv_dim=cross_dim, backend=backend)
            self.norm_cross = NORMS[norm](dim, eps, bias)
        self.mlp = FEEDFORWARDS[ffn](dim, ff_dim, bias)
        self.norm2 = NORMS[norm](dim, eps, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, causal: bool = False,
                position_ids: Tensor | None = None, rotary: nn.Module | None = None,
                alibi_slopes: Tensor | None = None, cache: KVCache | None = None, layer_idx: int = 0,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). ``context`` (B, S, cross_dim) feeds the cross-attention."""
        wrap = PLACEMENTS[self.placement]

        def self_attn(h: Tensor) -> Tensor:
            return self.attn(h, attn_mask=attn_mask, causal=causal, position_ids=position_ids, rotary=rotary,
                             alibi_slopes=alibi_slopes, cache=cache, layer_idx=layer_idx)

        x = wrap(x, self_attn, self.norm1, self.drop)
        if context is not None:
            if not hasattr(self, "cross_attn"):
                raise ValueError("context: this block was built without cross-attention (cross_dim=None)")
            x = wrap(x, lambda h: self.cross_attn(h, context=context, attn_mask=context_mask),
                     self.norm_cross, self.drop)
        return wrap(x, self.mlp, self.norm2, self.drop)
