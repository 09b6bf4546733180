"""FlashAttention in PyTorch: exact attention that never holds the (Tq, Tk) score matrix.

Queries are cut into blocks of ``block_q`` rows and keys/values into blocks of ``block_k`` columns.
For one query block the key blocks stream past while three running quantities are kept per row:

    m_new = max(m, rowmax(S_j))                          running maximum of the scores
    l_new = l·e^(m − m_new) + rowsum(e^(S_j − m_new))    running softmax denominator
    A_new = A·e^(m − m_new) + e^(S_j − m_new) V_j        output accumulator, rescaled to the new max
    O = A / l,   L = m + log l                           at the end (FA-2 divides once, at the end)

Forward saves only O and the log-sum-exp L (O(T) memory). Backward recomputes every probability
block P_ij = exp(S_ij − L_i) and uses D_i = rowsum(dO_i ∘ O_i):

    dV_j += P_ijᵀ dO_i     dP_ij = dO_i V_jᵀ     dS_ij = P_ij ∘ (dP_ij − D_i)
    dQ_i += dS_ij K_j · s   dK_j += dS_ijᵀ Q_i · s                         (s = softmax scale)

Dao et al., "FlashAttention" (2022), Algorithm 1; Dao, "FlashAttention-2" (2023), Algorithms 1-2.
Semantics are those of ``nanomm.nn.attention.attention``: bottom-right causal alignment, bool
(True = keep) or additive masks, ALiBi, GQA/MQA, and zeros for rows that may see no key.

Einstein legend: B batch · Hkv key/value heads · G query heads per key/value head (H = Hkv·G)
· q/k a query/key block · D head dim (Dv for values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Big tiles keep the work inside matmuls (on CPU: ~80% of the time in bmm at T=4096): each tile costs
# ~15 Python-level ops whatever its size, and a 256×1024 fp32 tile is 1 MiB per head, small beside
# the (T, T) matrices worth avoiding (256 MiB per head at T=8192). Measured in nanomm.bench.attention.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 1024

# Low-precision inputs are computed in fp32 (as the GPU kernels accumulate in fp32 registers).
_COMPUTE_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


# ----------------------------------------------------------------------------- tiling

@dataclass(frozen=True)
class _Setup:
    """Everything static that forward and backward share."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    offset: int  # Tk − Tq: query row i sits at absolute position i + offset (bottom-right alignment)


def _tiles(t_q: int, t_k: int, st: _Setup) -> Iterator[tuple[int, int, list[tuple[int, int, bool]]]]:
    """Yield (i0, i1, [(j0, j1, partial), ...]): each query block with the key blocks it can see.

    Under causal masking a key block lying wholly after the last query of the block is skipped, and
    ``partial`` says the block straddles the diagonal and needs the causal mask at all.
    """
    for i0 in range(0, t_q, st.block_q):
        i1 = min(i0 + st.block_q, t_q)
        last_key = min(t_k, i1 + st.offset) if st.causal else t_k  # keys j < i1 + offset are visible
        keys = []
        for j0 in range(0, max(last_key, 0), st.block_k):
            j1 = min(j0 + st.block_k, t_k)
            keys.append((j0, j1, st.causal and j1 - 1 > i0 + st.offset))
        yield i0, i1, keys


def _scores(q_i: Tensor, k_j: Tensor, i0: int, j0: int, partial: bool, st: _Setup,
            mask: Tensor | None, slopes: Tensor | None) -> Tensor:
    """Biased and masked scores of query block i against key block j: (B, Hkv, G, q, k).

    ``q_i`` is already multiplied by the scale. ``mask`` is the user's mask viewed as 5-D
    (B|1, Hkv|1, G|1, Tq|1, Tk|1); only the (q, k) window of this tile is ever read from it.
    """
    s = torch.einsum("bhgqd,bhkd->bhgqk", q_i, k_j)  # (B, Hkv, G, q, k)
    n_q, n_k = s.shape[-2], s.shape[-1]
    if slopes is not None or partial:
        i = torch.arange(i0 + st.offset, i0 + st.offset + n_q, device=s.device)[:, None]  # absolute positions
        j = torch.arange(j0, j0 + n_k, device=s.device)[None, :]
        if slopes is not None:  # ALiBi: −m_h·|i − j| (equals −m_h·(i − j) on every visible causal key)
            s.addcmul_(slopes, (i - j).abs().to(s.dtype), value=-1.0)
        if partial:
            s.masked_fill_(j > i, float("-inf"))
    if mask is not None:
        rows = slice(i0, i0 + n_q) if mask.shape[-2] > 1 else slice(None)
        cols = slice(j0, j0 + n_k) if mask.shape[-1] > 1 else slice(None)
        window = mask[..., rows, cols]
        if window.dtype == torch.bool:
            s.masked_fill_(window.logical_not(), float("-inf"))
        else:
            s.add_(window.to(s.dtype))
    return s


# ----------------------------------------------------------------------------- forward and backward

def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, slopes: Tensor | None,
             st: _Setup) -> tuple[Tensor, Tensor]:
    """Return O (B, Hkv, G, Tq, Dv) and L = log-sum-exp (B, Hkv, G, Tq), both in the compute dtype."""
    B, Hkv, G, t_q, _ = q.shape
    t_k, d_v = k.shape[2], v.shape[3]
    out = q.new_zeros(B, Hkv, G, t_q, d_v)
    lse = q.new_full((B, Hkv, G, t_q), math.inf)  # +inf for rows that see no key (see _backward)
    for i0, i1, keys in _tiles(t_q, t_k, st):
        q_i = q[:, :, :, i0:i1]  # (B, Hkv, G, q, D)
        m = q.new_full((B, Hkv, G, i1 - i0), -math.inf)
        l = q.new_zeros(B, Hkv, G, i1 - i0)
        acc = q.new_zeros(B, Hkv, G, i1 - i0, d_v)
        for j0, j1, partial in keys:
            s = _scores(q_i, k[:, :, j0:j1], i0, j0, partial, st, mask, slopes)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # a row with no visible key so far has m_new = −inf; shifting by 0 keeps exp() at 0, not NaN
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
            p = s.sub_(m_safe.unsqueeze(-1)).exp_()  # (B, Hkv, G, q, k), in place: s is not needed again
            alpha = (m - m_safe).exp_()  # what was summed under the old max is worth e^(m − m_new) now
            l = l.mul_(alpha).add_(p.sum(dim=-1))
            acc = acc.mul_(alpha.unsqueeze(-1)).add_(torch.einsum("bhgqk,bhkd->bhgqd", p, v[:, :, j0:j1]))
            m = m_new
        seen = l > 0
        out[:, :, :, i0:i1] = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), 0.0)
        lse[:, :, :, i0:i1] = torch.where(seen, m + l.clamp_min(1e-30).log(), math.inf)
    return out, lse


def _backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              mask: Tensor | None, slopes: Tensor | None, st: _Setup) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. the scaled q (5-D), k and v, recomputing P block by block.

    A row that saw no key has L = +inf, so every recomputed P = exp(S − ∞) is 0 and its grads are 0.
    """
    t_q, t_k = q.shape[3], k.shape[2]
    delta = (d_out * out).sum(dim=-1)  # D_i = rowsum(dO ∘ O), (B, Hkv, G, Tq)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1, keys in _tiles(t_q, t_k, st):
        q_i, do_i = q[:, :, :, i0:i1], d_out[:, :, :, i0:i1]
        lse_i, delta_i = lse[:, :, :, i0:i1, None], delta[:, :, :, i0:i1, None]
        dq_i = dq[:, :, :, i0:i1]  # a view: accumulating into it fills dq
        for j0, j1, partial in keys:
            k_j, v_j = k[:, :, j0:j1], v[:, :, j0:j1]
            p = _scores(q_i, k_j, i0, j0, partial, st, mask, slopes).sub_(lse_i).exp_()  # (B, Hkv, G, q, k)
            dv[:, :, j0:j1] += torch.einsum("bhgqk,bhgqd->bhkd", p, do_i)  # summed over the G query heads
            ds = torch.einsum("bhgqd,bhkd->bhgqk", do_i, v_j).sub_(delta_i).mul_(p)  # P ∘ (dP − D)
            dq_i += torch.einsum("bhgqk,bhkd->bhgqd", ds, k_j)
            dk[:, :, j0:j1] += torch.einsum("bhgqk,bhgqd->bhkd", ds, q_i)  # q_i carries the scale already
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, O and L (O(T) each), and recomputes the probabilities in backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, slopes: Tensor | None,
                st: _Setup) -> Tensor:
        B, H, t_q, _ = q.shape
        Hkv = k.shape[1]
        cdt = _COMPUTE_DTYPE[q.dtype]
        q5 = (q.to(cdt) * st.scale).unflatten(1, (Hkv, H // Hkv))  # (B, Hkv, G, Tq, D), scale folded in
        k_c, v_c = k.to(cdt), v.to(cdt)
        mask5 = None if mask is None else _mask_5d(mask, H, Hkv)
        slopes4 = None if slopes is None else slopes.to(cdt).view(Hkv, H // Hkv, 1, 1)
        out, lse = _forward(q5, k_c, v_c, mask5, slopes4, st)
        ctx.save_for_backward(q5, k_c, v_c, out, lse, mask5, slopes4)
        ctx.st, ctx.dtype = st, q.dtype
        return out.flatten(1, 2).to(q.dtype)  # (B, H, Tq, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q5, k_c, v_c, out, lse, mask5, slopes4 = ctx.saved_tensors
        st = ctx.st
        d_out = grad_out.to(out.dtype).reshape(out.shape)  # (B, Hkv, G, Tq, Dv)
        dq, dk, dv = _backward(d_out, q5, k_c, v_c, out, lse, mask5, slopes4, st)
        dq = (dq * st.scale).flatten(1, 2)  # S = (q·s) kᵀ, so dL/dq = s · dL/d(q·s)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None, None


def _mask_5d(mask: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """View a mask broadcastable to (B, H, Tq, Tk) as (B|1, Hkv|1, G|1, Tq|1, Tk|1), never copying it."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[1] == n_heads and n_heads > 1:
        return mask.unflatten(1, (n_kv_heads, n_heads // n_kv_heads))
    return mask.unsqueeze(2)


# ----------------------------------------------------------------------------- public API

def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask, alibi_slopes, scale, block_q, block_k, causal) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, heads, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in _COMPUTE_DTYPE:
            raise TypeError(f"{name}: expected one of {sorted(map(str, _COMPUTE_DTYPE))}, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v: expected one device, got q {q.device}, k {k.device}, v {v.device}")
    B, H, t_q, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected (B, Hkv, Tk, D) with B={B}, D={D} like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"k: expected a head count dividing q's {H} heads (GQA/MQA), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected (B, Hkv, Tk, Dv) = {tuple(k.shape[:3])} + (Dv,) like k {tuple(k.shape)}, got {tuple(v.shape)}")
    if attn_mask is not None:
        full = (B, H, t_q, k.shape[2])
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected bool (True = keep) or a float additive bias, got {attn_mask.dtype}")
        if attn_mask.dim() > 4 or any(m not in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full))):
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, Tq, Tk) = {full}, got {tuple(attn_mask.shape)}")
        if attn_mask.requires_grad:
            raise ValueError("attn_mask: flash_attention gives no gradient to the mask; pass attn_mask.detach()")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} like q, got {attn_mask.device}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
            got = alibi_slopes.dtype if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise TypeError(f"alibi_slopes: expected a float tensor of shape ({H},), got {got}")
        if tuple(alibi_slopes.shape) != (H,):
            raise ValueError(f"alibi_slopes: expected shape ({H},), one slope per query head of q {tuple(q.shape)}, got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.requires_grad:
            raise ValueError("alibi_slopes: flash_attention gives no gradient to the slopes; pass alibi_slopes.detach()")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name}: expected a positive int, got {b!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
                    alibi_slopes: Tensor | None = None, scale: float | None = None,
                    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> Tensor:
    """softmax(q kᵀ·scale + bias) v, tiled: q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) -> (B, H, Tq, Dv).

    Differentiable w.r.t. q, k, v. No tensor of Tq×Tk elements is created in forward or backward;
    the largest temporary is one (B, H, block_q, block_k) tile of scores.
    """
    _check(q, k, v, attn_mask, alibi_slopes, scale, block_q, block_k, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    st = _Setup(causal=causal, scale=scale, block_q=block_q, block_k=block_k, offset=k.shape[2] - q.shape[2])
    return FlashAttentionFunction.apply(q, k, v, attn_mask, alibi_slopes, st)


def notes_online_softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                                   block_k: int = DEFAULT_BLOCK_K) -> Tensor:
    """The notes' online softmax, completed the only way its two lines allow, and therefore WRONG.

    The notes update m and l but give no rule for the output, so the accumulator keeps terms
    e^(S − m_old) V from earlier blocks next to terms e^(S − m_new) V: they are never rescaled by
    e^(m_old − m_new). Dividing by the (correct) l at the end then over-weights early blocks.
    Kept only so the tour can measure the error; no masks, q (B, H, Tq, D), k/v (B, H, Tk, D).
    """
    _check(q, k, v, None, None, scale, 1, block_k, False)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: expected {q.shape[1]} heads like q {tuple(q.shape)}, got {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    m = q.new_full(q.shape[:3], -math.inf)
    l = q.new_zeros(q.shape[:3])
    acc = q.new_zeros(q.shape[:3] + v.shape[3:])
    for j0 in range(0, k.shape[2], block_k):
        s = (q @ k[:, :, j0:j0 + block_k].transpose(-2, -1)) * scale  # (B, H, Tq, k)
        m_new = torch.maximum(m, s.amax(dim=-1))
        p = torch.exp(s - m_new.unsqueeze(-1))
        l = l * torch.exp(m - m_new) + p.sum(dim=-1)  # the notes' two lines, verbatim
        acc = acc + p @ v[:, :, j0:j0 + block_k]  # missing: acc * exp(m - m_new)
        m = m_new
    return acc / l.unsqueeze(-1)
