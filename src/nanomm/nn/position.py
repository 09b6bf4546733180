"""Position encodings: learned, sinusoidal, ALiBi and RoPE.

Self-attention is permutation *equivariant*: shuffle the tokens and the outputs are shuffled the same
way. Order has to be injected, either into the inputs or into the attention scores.

  learned      x_t + P[t], one trained row per position (BERT, GPT-2); nothing exists past the table.
  sinusoidal   PE(t, 2i) = sin(t / 10000^(2i/d)),  PE(t, 2i+1) = cos(t / 10000^(2i/d))
               (Vaswani et al., 2017, §3.5).
  ALiBi        score_ij += −m_h · (i − j) for j ≤ i, slopes m_h = 2^(−8h/n) (Press et al., 2022).
               −m_h·|i − j| is the symmetric (bidirectional) variant.
  RoPE         rotate each pair of q/k coordinates by the angle t·θ_i, θ_i = base^(−2i/D), so that
               ⟨R(i) q, R(j) k⟩ depends on i − j only (Su et al., RoFormer, Eq. 16).

RoPE comes in two pairings of the D coordinates, and both are in use:
  interleaved  pairs (2i, 2i+1): Meta's LLaMA code and the complex-number form z_i = x_2i + i·x_2i+1;
  half         pairs (i, i + D/2): Hugging Face's `rotate_half`.
They are the same rotation up to a fixed permutation of the coordinates, which is why Hugging Face
permutes the rows of the q/k projection weights when converting Meta checkpoints
(`permute_qk_weight` below does the same, in either direction).

Einstein legend: B batch · H heads · T positions · D head dim · d model width.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "sinusoidal_table", "LearnedPositionalEmbedding", "SinusoidalPositionalEmbedding",
    "alibi_slopes", "alibi_bias", "rope_inv_freq", "apply_rotary", "RotaryEmbedding",
    "rope_permutation", "permute_qk_weight", "notes_apply_rope", "apply_rope_complex", "ROPE_LAYOUTS",
]


def _check_positions(position_ids: Tensor, limit: int | None = None) -> None:
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"position_ids: expected an integer torch.Tensor of shape (B, T) or (T,), "
                        f"got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool or position_ids.is_complex():
        raise TypeError(f"position_ids: expected an integer dtype, got {position_ids.dtype}")
    if position_ids.dim() not in (1, 2):
        raise ValueError(f"position_ids: expected shape (B, T) or (T,), got {tuple(position_ids.shape)}")
    if position_ids.numel() == 0:
        return
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0:
        raise ValueError(f"position_ids: expected values >= 0, got a minimum of {lo}")
    if limit is not None and hi >= limit:
        raise ValueError(f"position_ids: expected values < max_positions={limit}, got a maximum of {hi}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


# ----------------------------------------------------------------------------- absolute encodings

def sinusoidal_table(n_positions: int, dim: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (n_positions, dim) table of Vaswani et al.: sin at even columns 2i, cos at odd 2i+1."""
    _check_positive("n_positions", n_positions)
    _check_positive("dim", dim)
    if dim % 2:
        raise ValueError(f"dim: expected an even width (sin/cos come in pairs), got {dim}")
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (n, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (d/2,) the even column indices 2i
    angle = pos / 10000.0 ** (two_i / dim)  # (n, d/2); float64 so large positions keep their digits
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.to(dtype)


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position (BERT, GPT). Positions past ``max_positions`` do not exist."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        _check_positive("max_positions", max_positions)
        _check_positive("dim", dim)
        self.max_positions, self.dim = max_positions, dim
        self.weight = nn.Parameter(torch.randn(max_positions, dim) * 0.02)  # BERT/GPT-2 init scale

    def forward(self, position_ids: Tensor) -> Tensor:
        _check_positions(position_ids, self.max_positions)
        return self.weight[position_ids]  # (B, T, d) or (T, d)


class SinusoidalPositionalEmbedding(nn.Module):
    """The fixed sinusoidal table behind the same interface; not saved in state dicts (it is a formula)."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions, self.dim = max_positions, dim
        self.register_buffer("table", sinusoidal_table(max_positions, dim), persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        _check_positions(position_ids, self.max_positions)
        return self.table[position_ids]  # (B, T, d) or (T, d)


# ----------------------------------------------------------------------------- ALiBi

def _geometric_slopes(n: int) -> list[float]:
    # for n a power of two: start 2^(-8/n), each next slope the previous times the start
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(n_heads: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (n_heads,) ALiBi slopes of Press et al. (2022), §3 and their reference code.

    A power-of-two head count n gets 2^(−8/n), 2^(−16/n), …, 2^(−8) (8 heads: 1/2 … 1/256). Any other
    count takes the slopes of the closest lower power of two p, then the first n − p of every other
    slope (the 1st, 3rd, 5th …) of 2p heads, which interleave between the first ones.
    """
    _check_positive("n_heads", n_heads)
    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = _geometric_slopes(p) + _geometric_slopes(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float64).to(dtype)


def alibi_bias(slopes: Tensor, t_q: int, t_k: int, *, symmetric: bool = False) -> Tensor:
    """The (H, Tq, Tk) additive ALiBi bias, bottom-right aligned: query i sits at i + (Tk − Tq).

    symmetric=False gives the paper's causal bias −m·(i − j); it is positive above the diagonal, where
    the causal mask removes it anyway. symmetric=True gives −m·|i − j| for bidirectional attention.
    (The paper's code adds m·j instead, which differs by a per-row constant that softmax ignores.)
    """
    if not isinstance(slopes, Tensor) or slopes.dim() != 1:
        got = tuple(slopes.shape) if isinstance(slopes, Tensor) else type(slopes).__name__
        raise ValueError(f"slopes: expected a 1-D tensor (H,), got {got}")
    _check_positive("t_q", t_q)
    _check_positive("t_k", t_k)
    if t_q > t_k:
        raise ValueError(f"t_q: expected at most t_k={t_k} (queries are the last t_q of t_k positions), got {t_q}")
    i = torch.arange(t_q, device=slopes.device)[:, None] + (t_k - t_q)  # (Tq, 1) absolute positions
    j = torch.arange(t_k, device=slopes.device)[None, :]  # (1, Tk)
    dist = (i - j).abs() if symmetric else i - j  # (Tq, Tk)
    dtype = slopes.dtype if slopes.is_floating_point() else torch.float32
    return -slopes.to(dtype)[:, None, None] * dist.to(dtype)  # (H, Tq, Tk)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """θ_i = base^(−2i/D), i = 0 … D/2 − 1: the (D/2,) angular speed of each coordinate pair."""
    _check_positive("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even size (RoPE rotates pairs), got {head_dim}")
    if not base > 0:
        raise ValueError(f"base: expected a positive number, got {base!r}")
    # LLaMA and Hugging Face evaluate this in float32; doing the same keeps their angles bit for bit
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))


def _rotate_half_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # pair (i, i + D/2): (a, b) -> (a cos − b sin, a sin + b cos)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def _rotate_interleaved_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # pair (2i, 2i + 1): the same rotation with the pairs side by side
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


ROPE_LAYOUTS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "half": _rotate_half_pairs,
    "interleaved": _rotate_interleaved_pairs,
}


def _check_layout(layout: str) -> None:
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(ROPE_LAYOUTS)}, got {layout!r}")


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "half") -> Tensor:
    """Rotate the last axis of x (…, D) by angles whose cos/sin (…, D/2) broadcast against x[..., :D/2]."""
    _check_layout(layout)
    if cos.shape != sin.shape or cos.shape[-1] * 2 != x.shape[-1]:
        raise ValueError(f"cos, sin: expected equal shapes (..., D/2) with D={x.shape[-1]} like x, "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return ROPE_LAYOUTS[layout](x, cos, sin)


class RotaryEmbedding(nn.Module):
    """RoPE for (B, H, T, D) queries or keys at integer positions (B, T) or (T,).

    cos/sin of the float32 angles t·θ_i are cached for ``max_positions`` positions and the cache grows
    (doubling) when a longer position arrives. Per-row position_ids carry left padding: a row padded on
    the left simply starts its real tokens at position 0. The rotation runs in float32 (float64 for
    float64 input, with exact float64 angles) and the result is cast back to x's dtype, as LLaMA does.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, layout: str = "half", max_positions: int = 2048):
        super().__init__()
        _check_layout(layout)
        _check_positive("max_positions", max_positions)
        self.head_dim, self.base, self.layout = head_dim, float(base), layout
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, base), persistent=False)  # (D/2,)
        self._build_cache(max_positions)

    def _build_cache(self, n: int) -> None:
        angles = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq  # (n, D/2)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    @property
    def cached_positions(self) -> int:
        return self.cos_cached.shape[0]

    def cos_sin(self, position_ids: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (*position_ids.shape, D/2) in float32 (or float64 when asked)."""
        _check_positions(position_ids)
        if dtype == torch.float64:  # exact angles for float64 checks; not cached, never hot
            inv = rope_inv_freq(self.head_dim, self.base, dtype=torch.float64).to(position_ids.device)
            angles = position_ids.to(torch.float64)[..., None] * inv
            return angles.cos(), angles.sin()
        need = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if need > self.cached_positions:
            self._build_cache(max(need, 2 * self.cached_positions))
        return self.cos_cached[position_ids], self.sin_cached[position_ids]

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected (B, H, T, D) with D={self.head_dim}, got {got}")
        B, _, T, _ = x.shape
        if isinstance(position_ids, Tensor) and tuple(position_ids.shape) not in ((T,), (B, T)):
            raise ValueError(f"position_ids: expected ({T},) or ({B}, {T}) for x {tuple(x.shape)}, "
                             f"got {tuple(position_ids.shape)}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(position_ids, work)  # (T, D/2) or (B, T, D/2)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): the same angle for every head
        return ROPE_LAYOUTS[self.layout](x.to(work), cos, sin).to(x.dtype)


# ----------------------------------------------------------------------------- interleaved <-> half

def rope_permutation(head_dim: int) -> Tensor:
    """Index p with x_half = x_interleaved[..., p]: evens first, then odds ([0, 2, …, 1, 3, …]).

    It maps the interleaved pair (2i, 2i+1) onto the half-split pair (i, i + D/2), so
    rope_half(x[..., p]) == rope_interleaved(x)[..., p]; argsort(p) goes back.
    """
    _check_positive("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even size, got {head_dim}")
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def permute_qk_weight(weight: Tensor, n_heads: int, *, to: str = "half") -> Tensor:
    """Reorder the output rows of a q or k projection (weight (H·D, d_in) or bias (H·D,)) per head.

    to="half" turns a Meta (interleaved) checkpoint into the Hugging Face (rotate_half) layout;
    to="interleaved" undoes it. Attention scores are unchanged because q and k move together.
    For grouped-query attention pass the key/value head count for k_proj.
    """
    if not isinstance(weight, Tensor) or weight.dim() not in (1, 2):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected (n_heads*head_dim, d_in) or (n_heads*head_dim,), got {got}")
    _check_positive("n_heads", n_heads)
    if weight.shape[0] % n_heads or (weight.shape[0] // n_heads) % 2:
        raise ValueError(f"weight: expected a first dim of n_heads={n_heads} × an even head_dim, "
                         f"got shape {tuple(weight.shape)}")
    perms = {"half": lambda p: p, "interleaved": torch.argsort}
    if to not in perms:
        raise ValueError(f"to: expected one of {sorted(perms)}, got {to!r}")
    p = perms[to](rope_permutation(weight.shape[0] // n_heads)).to(weight.device)
    per_head = weight.unflatten(0, (n_heads, -1))  # (H, D, ...)
    return per_head[:, p].flatten(0, 1)


# ----------------------------------------------------------------------------- the notes' snippet

def _complex_rotate(x: Tensor, freqs: Tensor) -> Tensor:
    z = torch.view_as_complex(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
                              .reshape(*x.shape[:-1], -1, 2).contiguous())  # z_i = x_2i + i·x_2i+1
    rotated = z * torch.polar(torch.ones_like(freqs), freqs)  # multiply by e^{i·angle}
    return torch.view_as_real(rotated).reshape(x.shape).to(x.dtype)


def notes_apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """The notes' apply_rope, transcribed to torch with its bug kept: x (B, S, H, D), freqs (S, D/2).

    freqs (S, D/2) is broadcast from the right against (B, S, H, D/2), so it lines up with the *heads*
    axis: head h is rotated by the angles of position h. With S == H this runs and is silently wrong;
    with S != H (and H != 1) it raises a broadcasting error. Kept for tour chapter 7.
    """
    return _complex_rotate(x, freqs)


def apply_rope_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """The fixed snippet: freqs[None, :, None, :] puts positions on the S axis of x (B, S, H, D).

    This is the interleaved layout (Meta's LLaMA): equal to RotaryEmbedding(layout="interleaved")
    applied to x.transpose(1, 2).
    """
    if x.dim() != 4 or tuple(freqs.shape) != (x.shape[1], x.shape[3] // 2):
        raise ValueError(f"freqs: expected (S, D/2) = ({x.shape[1] if x.dim() == 4 else '?'}, "
                         f"{x.shape[-1] // 2}) for x (B, S, H, D) {tuple(x.shape)}, got {tuple(freqs.shape)}")
    return _complex_rotate(x, freqs[None, :, None, :])
