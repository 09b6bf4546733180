"""nanomm.nn.attention against torch's scaled_dot_product_attention, and the KV cache against no cache."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nanomm.nn.attention import KVCache, MultiHeadAttention, attention

# (B, H, Hkv, Tq, Tk, D): MHA, GQA, MQA, with Tq == Tk, Tq < Tk (decoding) and Tq > Tk
SHAPES = [(2, 4, 4, 6, 6, 8), (2, 4, 2, 3, 9, 8), (1, 6, 1, 5, 5, 16), (2, 4, 2, 7, 4, 8), (1, 2, 2, 1, 11, 4)]
MASKS = ["none", "bool", "float", "bool-per-batch"]


def _reference(q, k, v, causal, mask):
    """torch's sdpa with our conventions spelled out: bottom-right causal, GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    bias = torch.zeros(Tq, Tk, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    if mask is not None:
        bias = bias + (torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return torch.nan_to_num(out, nan=0.0)  # fully masked rows: torch gives NaN, our convention is 0


def _mask(kind, B, H, Tq, Tk, gen):
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(1, H, Tq, Tk, generator=gen) > 0.3
        m[..., 0] = True  # keep one key per row so every row stays defined for torch too
        return m
    if kind == "float":
        return torch.randn(Tq, Tk, generator=gen, dtype=torch.float64)
    m = torch.rand(B, 1, 1, Tk, generator=gen) > 0.4  # a padding mask
    m[..., -1] = True
    return m


@pytest.mark.parametrize("shape,causal,mask_kind,backend",
                         list(itertools.product(SHAPES, [False, True], MASKS, ["naive", "sdpa"])))
def test_matches_torch_sdpa(shape, causal, mask_kind, backend):
    B, H, Hkv, Tq, Tk, D = shape
    gen = torch.Generator().manual_seed(hash((shape, causal, mask_kind)) % 2**31)
    q = torch.randn(B, H, Tq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
    mask = _mask(mask_kind, B, H, Tq, Tk, gen)
    out = attention(q, k, v, causal=causal, attn_mask=mask, backend=backend)
    # float64 on both sides: only summation order differs, so 1e-12 is generous and still catches any logic error
    torch.testing.assert_close(out, _reference(q, k, v, causal, mask), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_fully_masked_rows_are_zero_not_nan(backend):
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = attention(q, k, v, causal=True, backend=backend)  # Tq > Tk: the first 2 queries see no key
    assert torch.all(out[:, :, :2] == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_naive_equals_sdpa_with_explicit_bias(causal):
    H, Tq, Tk = 4, 5, 8
    q, k, v = (torch.randn(2, H, t, 8, dtype=torch.float64) for t in (Tq, Tk, Tk))
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)], dtype=torch.float64)
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    dist = (i - j) if causal else (i - j).abs()
    bias = -slopes[:, None, None] * dist
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    for backend in ("naive", "sdpa"):
        got = attention(q, k, v, causal=causal, alibi_slopes=slopes, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_and_sdpa_agree_in_low_precision(dtype):
    q, k, v = (torch.randn(2, 4, 16, 32, dtype=dtype) for _ in range(3))
    a = attention(q, k, v, causal=True, backend="naive").double()
    b = attention(q, k, v, causal=True, backend="sdpa").double()
    truth = attention(q.double(), k.double(), v.double(), causal=True, backend="naive")
    # each is within its dtype's rounding of the float64 truth (bf16 has 8 mantissa bits)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert (a - truth).abs().max() < tol and (b - truth).abs().max() < tol


BAD = [
    ("q", dict(q=torch.randn(2, 4, 8)), "q: expected 4 dims"),
    ("k", dict(k=torch.randn(2, 4, 5, 16)), "k: expected (B=2, Hkv, Tk, D=8)"),
    ("v", dict(v=torch.randn(2, 4, 6, 8)), "v: expected the shape of k"),
    ("heads", dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), "must divide q's 4 heads"),
    ("dtype", dict(k=torch.randn(2, 4, 5, 8, dtype=torch.float64)), "expected one dtype"),
    ("mask-shape", dict(attn_mask=torch.ones(3, 4, 5, dtype=torch.bool)), "attn_mask: expected a shape broadcastable to (B, H, Tq, Tk) = (2, 4, 3, 5)"),
    ("mask-dtype", dict(attn_mask=torch.ones(3, 5, dtype=torch.int64)), "attn_mask: expected bool"),
    ("alibi", dict(alibi_slopes=torch.ones(3)), "alibi_slopes: expected a tensor of shape (4,)"),
    ("backend", dict(backend="fast"), "backend: expected one of"),
]


@pytest.mark.parametrize("name,override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, override, message):
    args = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 4, 5, 8), v=torch.randn(2, 4, 5, 8))
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError)) as err:
        attention(q, k, v, **args)
    assert message in str(err.value)


# ----------------------------------------------------------------------------- MultiHeadAttention

class _ToyRotary(torch.nn.Module):
    """A position-dependent map standing in for RoPE: the cache must see the same positions."""

    def forward(self, x, position_ids):
        return x * (1.0 + 0.1 * position_ids.to(x.dtype))[..., :, None]


@pytest.mark.parametrize("n_kv_heads,rotary", [(4, None), (2, None), (1, _ToyRotary())])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads, rotary):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, n_kv_heads, bias=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = mha(x, causal=True, rotary=rotary)
    cache = KVCache()
    steps = [mha(x[:, :5], causal=True, rotary=rotary, cache=cache)]  # the prompt, then one token at a time
    for t in range(5, 9):
        steps.append(mha(x[:, t:t + 1], causal=True, rotary=rotary, cache=cache))
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)


def test_cross_attention_shapes_and_reference():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, kv_dim=24).double()
    x, ctx = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 7, 24, dtype=torch.float64)
    out = mha(x, context=ctx)
    ref = torch.nn.MultiheadAttention(16, 2, kdim=24, vdim=24, batch_first=True).double()
    with torch.no_grad():
        ref.q_proj_weight.copy_(mha.q_proj.weight)
        ref.k_proj_weight.copy_(mha.k_proj.weight)
        ref.v_proj_weight.copy_(mha.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.weight.copy_(mha.o_proj.weight)
        ref.out_proj.bias.copy_(mha.o_proj.bias)
    want, _ = ref(x, ctx, ctx, need_weights=False)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=30, n_heads=4), "n_heads: expected a divisor of dim=30"),
    (dict(dim=32, n_heads=4, n_kv_heads=3), "n_kv_heads: expected a divisor of n_heads=4"),
    (dict(dim=32, n_heads=4, backend="x"), "backend: expected one of"),
])
def test_mha_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


def test_cache_rejects_mismatched_heads():
    cache = KVCache()
    cache.update(0, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="like the cached keys of layer 0"):
        cache.update(0, torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))
