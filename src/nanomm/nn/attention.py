"""Scaled dot-product attention behind one signature, and multi-head attention with a KV cache.

    Attention(q, k, v) = softmax(q kᵀ · s + bias) v,    s = 1/√D        (Vaswani et al., 2017)

Three backends compute the same function and differ only in memory and speed:
  naive  the textbook form: the full (Tq, Tk) score matrix is built, soft-maxed and multiplied by v
  flash  nanomm's tiled online-softmax kernel (nanomm.nn.flash): never holds a (Tq, Tk) tensor
  sdpa   torch.nn.functional.scaled_dot_product_attention

Conventions shared by all three:
  * causal masking is aligned bottom-right: with Tq < Tk (decoding against a KV cache) query i sits at
    absolute position i + (Tk − Tq) and sees keys j ≤ i + (Tk − Tq);
  * attn_mask is boolean (True = keep) or an additive float bias, broadcastable to (B, H, Tq, Tk);
  * ALiBi (Press et al., 2022) adds −m_h·(i − j) under causal masking and −m_h·|i − j| without;
  * a query row that may see no key at all returns zeros, never NaN.

Einstein legend: B batch · H query heads · Hkv key/value heads (H % Hkv == 0; Hkv < H is GQA, 1 is MQA)
· G = H / Hkv query heads per key/value head · Tq, Tk query and key lengths · D head dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("naive", "flash", "sdpa", "auto")


# ----------------------------------------------------------------------------- validation

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, alibi_slopes: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, heads, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating dtype, got {q.dtype}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected (B={B}, Hkv, Tk, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"k: its {k.shape[1]} heads must divide q's {H} heads (GQA), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if attn_mask is not None:
        _check_mask(attn_mask, (B, H, q.shape[2], k.shape[2]))
    if alibi_slopes is not None and (not isinstance(alibi_slopes, Tensor) or tuple(alibi_slopes.shape) != (H,)):
        got = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
        raise ValueError(f"alibi_slopes: expected a tensor of shape ({H},), one slope per query head, got {got}")


def _check_mask(mask: Tensor, full: tuple[int, int, int, int]) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask: expected bool (True = keep) or a float additive bias, got {mask.dtype}")
    ok = mask.dim() <= 4 and all(m in (1, f) for m, f in zip(reversed(mask.shape), reversed(full)))
    if not ok:
        raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, Tq, Tk) = {full}, got {tuple(mask.shape)}")


# ----------------------------------------------------------------------------- shared pieces

def positional_bias(t_q: int, t_k: int, *, causal: bool, alibi_slopes: Tensor | None,
                    device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The additive (H or 1, Tq, Tk) bias of causal masking and ALiBi, or None when neither is asked for."""
    if not causal and alibi_slopes is None:
        return None
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # absolute query positions, (Tq, 1)
    j = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
    bias = torch.zeros(1, t_q, t_k, device=device, dtype=dtype)
    if alibi_slopes is not None:
        dist = (i - j) if causal else (i - j).abs()
        bias = -alibi_slopes.to(device=device, dtype=dtype)[:, None, None] * dist.to(dtype)  # (H, Tq, Tk)
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _combined_bias(q: Tensor, k: Tensor, causal: bool, attn_mask: Tensor | None, alibi_slopes: Tensor | None) -> Tensor | None:
    bias = positional_bias(q.shape[2], k.shape[2], causal=causal, alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype)
    if attn_mask is not None:
        user = _as_additive(attn_mask, q.dtype)
        bias = user if bias is None else bias + user
    return bias


def _dead_rows(bias: Tensor | None) -> Tensor | None:
    """Rows of the bias where every key is masked: softmax would give NaN there, we give 0."""
    if bias is None:
        return None
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    return dead if bool(dead.any()) else None


# ----------------------------------------------------------------------------- the three backends

def _naive(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None,
           alibi_slopes: Tensor | None, scale: float) -> Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    bias = _combined_bias(q, k, causal, attn_mask, alibi_slopes)
    if bias is not None:
        scores = scores + bias
    dead = _dead_rows(bias)
    if dead is not None:
        scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    return probs @ v  # (B, H, Tq, D)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None,
          alibi_slopes: Tensor | None, scale: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None and alibi_slopes is None and (not causal or q.shape[2] == k.shape[2]):
        # torch's is_causal is top-left aligned, which agrees with ours only when Tq == Tk
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    bias = _combined_bias(q, k, causal, attn_mask, alibi_slopes)
    dead = _dead_rows(bias)
    if dead is not None:
        bias = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)
    return out if dead is None else out.masked_fill(dead, 0.0)


def _flash(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None,
           alibi_slopes: Tensor | None, scale: float) -> Tensor:
    from nanomm.nn.flash import flash_attention  # imported late: flash.py is a leaf module of its own

    return flash_attention(q, k, v, causal=causal, attn_mask=attn_mask, alibi_slopes=alibi_slopes, scale=scale)


_BACKEND_FNS: dict[str, Callable[..., Tensor]] = {"naive": _naive, "flash": _flash, "sdpa": _sdpa, "auto": _sdpa}


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
              alibi_slopes: Tensor | None = None, scale: float | None = None, backend: str = "auto") -> Tensor:
    """softmax(q kᵀ·scale + bias) v for q (B, H, Tq, D) and k, v (B, Hkv, Tk, D); returns (B, H, Tq, D).

    backend: "naive" | "flash" | "sdpa" | "auto" (= "sdpa", torch's fused kernel).
    """
    if backend not in _BACKEND_FNS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, attn_mask, alibi_slopes)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _BACKEND_FNS[backend](q, k, v, causal=causal, attn_mask=attn_mask, alibi_slopes=alibi_slopes, scale=scale)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of past positions, one entry per layer, grown along the sequence axis.

    Decoding step t then costs O(t) instead of recomputing the O(t²) attention of the whole prefix.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor | None] = []
        self.values: list[Tensor | None] = []

    def get_length(self, layer_idx: int = 0) -> int:
        """Number of positions cached for ``layer_idx`` (0 when empty)."""
        if layer_idx >= len(self.keys) or self.keys[layer_idx] is None:
            return 0
        return self.keys[layer_idx].shape[2]

    @property
    def length(self) -> int:
        return self.get_length(0)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, Hkv, T_new, D) to layer ``layer_idx``; return all its keys and values."""
        if layer_idx < 0:
            raise ValueError(f"layer_idx: expected >= 0, got {layer_idx}")
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        past_k = self.keys[layer_idx]
        if past_k is not None and (past_k.shape[:2] != k.shape[:2] or past_k.shape[3] != k.shape[3]):
            raise ValueError(f"k: expected (B, Hkv, T, D) = ({past_k.shape[0]}, {past_k.shape[1]}, T, {past_k.shape[3]}) "
                             f"like the cached keys of layer {layer_idx}, got {tuple(k.shape)}")
        if past_k is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([past_k, k], dim=2)  # (B, Hkv, T_past + T_new, D)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search, dropping finished sequences)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


# ----------------------------------------------------------------------------- multi-head attention

class MultiHeadAttention(nn.Module):
    """Project to heads, attend, project back: o_proj(concat_h attention(x W_q^h, c W_k^h, c W_v^h)).

    Self-attention when ``context`` is None, cross-attention to ``context`` (B, S, kv_dim) otherwise.
    ``n_kv_heads`` < ``n_heads`` shares each key/value head among n_heads / n_kv_heads query heads.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, bias: bool = True,
                 kv_dim: int | None = None, out_bias: bool | None = None, backend: str = "auto") -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim % n_heads != 0:
            raise ValueError(f"n_heads: expected a divisor of dim={dim}, got {n_heads}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.backend = backend
        kv_dim = dim if kv_dim is None else kv_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias if out_bias is None else out_bias)

    def _heads(self, t: Tensor, n: int) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(self, x: Tensor, *, context: Tensor | None = None, attn_mask: Tensor | None = None,
                causal: bool = False, position_ids: Tensor | None = None, rotary: nn.Module | None = None,
                alibi_slopes: Tensor | None = None, cache: KVCache | None = None, layer_idx: int = 0) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x: expected (B, T, dim), got shape {tuple(x.shape)}")
        if context is not None and cache is not None:
            raise ValueError("cache: a KVCache holds self-attention keys; got one together with a cross-attention context")
        B, T, dim = x.shape
        source = x if context is None else context
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        k = self._heads(self.k_proj(source), self.n_kv_heads)  # (B, Hkv, S, D)
        v = self._heads(self.v_proj(source), self.n_kv_heads)
        if rotary is not None:
            if position_ids is None:
                past = cache.get_length(layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + T, device=x.device)
            q, k = rotary(q, position_ids), rotary(k, position_ids)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, T_past + T, D)
        y = attention(q, k, v, causal=causal, attn_mask=attn_mask, alibi_slopes=alibi_slopes, backend=self.backend)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, dim))  # (B, T, dim)
