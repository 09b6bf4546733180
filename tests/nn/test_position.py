"""Position encodings against their papers, Hugging Face's RoPE, and each other."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.nn.attention import attention
from nanomm.nn.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope_complex,
    apply_rotary,
    notes_apply_rope,
    permute_qk_weight,
    rope_inv_freq,
    rope_permutation,
    sinusoidal_table,
)

# ----------------------------------------------------------------------------- absolute


@pytest.mark.parametrize("n,d", [(1, 2), (7, 6), (64, 16), (513, 8)])
def test_sinusoidal_table_is_the_vaswani_formula(n, d):
    truth = torch.tensor(
        [[(math.sin if c % 2 == 0 else math.cos)(p / 10000 ** ((c - c % 2) / d)) for c in range(d)] for p in range(n)],
        dtype=torch.float64,
    )
    # float64: both sides evaluate the same closed form; 1e-12 leaves room for pow/sin rounding at p≈500
    torch.testing.assert_close(sinusoidal_table(n, d, dtype=torch.float64), truth, rtol=0, atol=1e-12)
    # float32: one rounding of a value in [-1, 1], at most half an ulp of 1 = 2^-24
    assert (sinusoidal_table(n, d) - truth).abs().max() <= 2**-24


def test_sinusoidal_module_reads_the_table_and_is_not_saved():
    emb = SinusoidalPositionalEmbedding(32, 8)
    pos = torch.tensor([[3, 1, 0], [31, 30, 29]])
    assert torch.equal(emb(pos), sinusoidal_table(32, 8)[pos])
    assert "table" not in emb.state_dict()


def test_learned_embedding_rows_are_trained_and_bounded():
    emb = LearnedPositionalEmbedding(16, 4)
    out = emb(torch.tensor([[0, 5], [15, 15]]))
    assert out.shape == (2, 2, 4) and torch.equal(out[1, 0], emb.weight[15])
    out.sum().backward()
    assert emb.weight.grad[15].eq(2).all() and emb.weight.grad[1].eq(0).all()
    with pytest.raises(ValueError, match=r"position_ids.*max_positions=16.*16"):
        emb(torch.tensor([16]))


# ----------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_for_8_heads_are_powers_of_one_half():
    expected = torch.tensor([2.0**-h for h in range(1, 9)], dtype=torch.float64)
    assert torch.equal(alibi_slopes(8, dtype=torch.float64), expected)
    assert torch.equal(alibi_slopes(8), expected.float())  # powers of two are exact in float32


def test_alibi_slopes_for_12_heads_follow_the_paper_rule():
    # closest lower power of two is 8: its slopes 2^-1…2^-8, then every other slope of 16 heads
    # (2^-0.5, 2^-1.5, …) taking the first 12 − 8 = 4 of them
    expected = [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-15, atol=0)


@given(st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_alibi_slopes_are_distinct_and_in_unit_interval(n):
    s = alibi_slopes(n, dtype=torch.float64)
    assert s.shape == (n,) and (s > 0).all() and (s < 1).all()
    assert s.unique().numel() == n


@pytest.mark.parametrize("t_q,t_k", [(5, 5), (2, 6), (1, 9)])
def test_alibi_bias_is_bottom_right_aligned(t_q, t_k):
    slopes = alibi_slopes(4, dtype=torch.float64)
    causal = alibi_bias(slopes, t_q, t_k)
    sym = alibi_bias(slopes, t_q, t_k, symmetric=True)
    for h in range(4):
        for i in range(t_q):
            for j in range(t_k):
                i_abs = i + t_k - t_q
                assert causal[h, i, j] == -slopes[h] * (i_abs - j)
                assert sym[h, i, j] == -slopes[h] * abs(i_abs - j)
    visible = torch.ones(t_q, t_k).tril(t_k - t_q).bool()  # j <= i + Tk - Tq
    assert torch.equal(causal[:, visible], sym[:, visible])  # the two agree where causal attention looks


def test_alibi_bias_matches_what_attention_adds():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, t, 8, dtype=torch.float64) for t in (3, 6, 6))
    slopes = alibi_slopes(4, dtype=torch.float64)
    mask = torch.ones(3, 6).tril(3).bool()
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + alibi_bias(slopes, 3, 6)
    expected = scores.masked_fill(~mask, -math.inf).softmax(-1) @ v
    got = attention(q, k, v, causal=True, alibi_slopes=slopes, backend="naive")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # float64, same arithmetic


# ----------------------------------------------------------------------------- RoPE


def _hf_rope(q, position_ids, head_dim, base=10000.0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=head_dim * q.shape[1], num_attention_heads=q.shape[1], rope_theta=base,
                      max_position_embeddings=64)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, position_ids)
    return apply_rotary_pos_emb(q, q, cos, sin)[0]


POSITIONS = {
    "arange": lambda B, T: torch.arange(T)[None].expand(B, T),
    "offset_rows": lambda B, T: torch.arange(T)[None] + torch.tensor([[0], [17]]),
    "left_padded": lambda B, T: torch.tensor([[0] * 3 + list(range(T - 3)), list(range(T))]),
    "past_the_cache": lambda B, T: torch.arange(T)[None] + torch.tensor([[100], [3000]]),
}


@pytest.mark.parametrize("positions", sorted(POSITIONS))
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_half_layout_matches_transformers_llama(positions, base):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 9, 16
    q = torch.randn(B, H, T, D)
    pos = POSITIONS[positions](B, T)
    rope = RotaryEmbedding(D, base=base, max_positions=8)  # small on purpose: the cache must grow
    # float32: the same angles (float32 products) and the same four products per pair; 1e-6 absorbs
    # a different rounding of a·cos − b·sin for |a|, |b| up to ~4
    torch.testing.assert_close(rope(q, pos), _hf_rope(q, pos, D, base), rtol=0, atol=1e-6)
    assert rope.cached_positions > int(pos.max())


def test_one_dimensional_positions_broadcast_over_the_batch():
    rope = RotaryEmbedding(8)
    x = torch.randn(3, 2, 5, 8)
    assert torch.equal(rope(x, torch.arange(5)), rope(x, torch.arange(5)[None].expand(3, 5)))


def test_left_padding_rotates_real_tokens_as_if_unpadded():
    rope = RotaryEmbedding(8, layout="interleaved")
    real = torch.randn(1, 2, 4, 8)
    padded = torch.cat([torch.zeros(1, 2, 3, 8), real], dim=2)
    out = rope(padded, torch.tensor([[0, 0, 0, 0, 1, 2, 3]]))
    assert torch.equal(out[:, :, 3:], rope(real, torch.arange(4)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_rounds_once(dtype):
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 2, 6, 16).to(dtype)
    out = rope(x, torch.arange(6))
    assert out.dtype == dtype
    ref = rope(x.float(), torch.arange(6))
    # rotated in float32, rounded once to dtype: half an ulp relative to |value| (bf16 2^-8, fp16 2^-11)
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


def _rotate(layout, vec, pos):
    rope = RotaryEmbedding(vec.shape[-1], layout=layout)
    return rope(vec[None, None, None], torch.tensor([pos]))[0, 0, 0]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@given(
    i=st.integers(0, 300), j=st.integers(0, 300), shift=st.integers(-300, 300),
    seed=st.integers(0, 2**16), half_dim=st.integers(1, 8),
)
@settings(max_examples=30, deadline=None)
def test_rotated_dot_product_depends_only_on_the_offset(layout, i, j, shift, seed, half_dim):
    shift = max(shift, -min(i, j))  # keep both positions >= 0
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2 * half_dim, generator=g, dtype=torch.float64)
    a = _rotate(layout, q, i) @ _rotate(layout, k, j)
    b = _rotate(layout, q, i + shift) @ _rotate(layout, k, j + shift)
    # float64 angles up to 600 rad: cos/sin carry ~1e-13 absolute error, dot products of O(10)
    assert abs(float(a - b)) <= 1e-10 * (1 + float(q.norm() * k.norm()))
    assert torch.isclose(_rotate(layout, q, i).norm(), q.norm(), rtol=1e-12)  # a rotation keeps length


def test_layouts_agree_after_the_coordinate_permutation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 12, dtype=torch.float64)
    pos = torch.arange(7)
    p = rope_permutation(12)
    half = RotaryEmbedding(12, layout="half")(x[..., p], pos)
    inter = RotaryEmbedding(12, layout="interleaved")(x, pos)[..., p]
    torch.testing.assert_close(half, inter, rtol=0, atol=1e-14)  # float64, identical arithmetic per pair
    assert torch.equal(p, torch.tensor([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]))


def _reference_hf_permute(w, n_heads):
    # the reshape form of the Meta -> HF conversion, written independently of nanomm's index form
    d_out = w.shape[0]
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim,d_in", [(4, 8, 32), (2, 16, 7), (1, 4, 3)])
def test_weight_permutation_converts_meta_to_hf(n_heads, head_dim, d_in):
    torch.manual_seed(0)
    w = torch.randn(n_heads * head_dim, d_in)
    w_hf = permute_qk_weight(w, n_heads, to="half")
    assert torch.equal(w_hf, _reference_hf_permute(w, n_heads))
    assert torch.equal(permute_qk_weight(w_hf, n_heads, to="interleaved"), w)
    b = torch.randn(n_heads * head_dim)
    assert torch.equal(permute_qk_weight(b, n_heads), _reference_hf_permute(b, n_heads))


def test_attention_scores_unchanged_by_converting_weights():
    torch.manual_seed(0)
    H, D, d, T = 4, 8, 32, 6
    wq, wk = torch.randn(2, H * D, d, dtype=torch.float64)
    x = torch.randn(2, T, d, dtype=torch.float64)
    pos = torch.arange(T)

    def scores(wq, wk, layout):
        rope = RotaryEmbedding(D, layout=layout)
        q = rope((x @ wq.T).view(2, T, H, D).transpose(1, 2), pos)
        k = rope((x @ wk.T).view(2, T, H, D).transpose(1, 2), pos)
        return q @ k.transpose(-1, -2)

    meta = scores(wq, wk, "interleaved")
    hf = scores(permute_qk_weight(wq, H), permute_qk_weight(wk, H), "half")
    torch.testing.assert_close(hf, meta, rtol=1e-12, atol=1e-10)  # float64, sums reordered


def test_apply_rotary_is_the_module_rotation():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 4, 8)
    cos, sin = rope.cos_sin(torch.arange(4))
    assert torch.equal(apply_rotary(x, cos, sin), rope(x, torch.arange(4)))


# ----------------------------------------------------------------------------- the notes' snippet


def _freqs(S, D):
    return torch.arange(S, dtype=torch.float32)[:, None] * rope_inv_freq(D)  # (S, D/2)


def test_fixed_complex_snippet_is_the_interleaved_layout():
    x = torch.randn(2, 5, 3, 8)  # (B, S, H, D) as in the notes
    expected = RotaryEmbedding(8, layout="interleaved")(x.transpose(1, 2), torch.arange(5)).transpose(1, 2)
    torch.testing.assert_close(apply_rope_complex(x, _freqs(5, 8)), expected, rtol=0, atol=1e-6)


def test_notes_snippet_is_silently_wrong_when_seq_equals_heads():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)
    wrong, right = notes_apply_rope(x, _freqs(4, 8)), apply_rope_complex(x, _freqs(4, 8))
    assert wrong.shape == x.shape and (wrong - right).abs().max() > 0.1
    # it rotates head h by position h: head 0 gets angle 0, so its output is x unchanged at every s
    assert torch.equal(wrong[:, :, 0], x[:, :, 0])


def test_notes_snippet_fails_loudly_when_seq_differs_from_heads():
    with pytest.raises(RuntimeError):
        notes_apply_rope(torch.randn(2, 5, 4, 8), _freqs(5, 8))


# ----------------------------------------------------------------------------- input validation

BAD_INPUTS = [
    (lambda: sinusoidal_table(4, 5), ValueError, r"dim: expected an even.*got 5"),
    (lambda: sinusoidal_table(0, 4), ValueError, r"n_positions: expected a positive int, got 0"),
    (lambda: alibi_slopes(0), ValueError, r"n_heads: expected a positive int, got 0"),
    (lambda: alibi_bias(torch.ones(2, 2), 3, 3), ValueError, r"slopes: expected a 1-D tensor.*\(2, 2\)"),
    (lambda: alibi_bias(torch.ones(2), 4, 3), ValueError, r"t_q: expected at most t_k=3.*got 4"),
    (lambda: RotaryEmbedding(7), ValueError, r"head_dim: expected an even size.*got 7"),
    (lambda: RotaryEmbedding(8, layout="meta"), ValueError, r"layout: expected one of.*'meta'"),
    (lambda: RotaryEmbedding(8)(torch.randn(1, 2, 3, 6), torch.arange(3)), ValueError,
     r"x: expected \(B, H, T, D\) with D=8, got \(1, 2, 3, 6\)"),
    (lambda: RotaryEmbedding(8)(torch.randn(1, 2, 3, 8), torch.arange(4)), ValueError,
     r"position_ids: expected \(3,\) or \(1, 3\).*got \(4,\)"),
    (lambda: RotaryEmbedding(8)(torch.randn(1, 2, 3, 8), torch.arange(3.0)), TypeError,
     r"position_ids: expected an integer dtype, got torch.float32"),
    (lambda: RotaryEmbedding(8)(torch.randn(1, 2, 3, 8), torch.tensor([0, -1, 2])), ValueError,
     r"position_ids: expected values >= 0, got a minimum of -1"),
    (lambda: permute_qk_weight(torch.randn(12, 4), 8), ValueError, r"weight: expected a first dim of n_heads=8"),
    (lambda: permute_qk_weight(torch.randn(16, 4), 2, to="meta"), ValueError, r"to: expected one of"),
    (lambda: apply_rope_complex(torch.randn(1, 4, 2, 8), torch.zeros(3, 4)), ValueError,
     r"freqs: expected \(S, D/2\) = \(4, 4\).*got \(3, 4\)"),
    (lambda: apply_rotary(torch.randn(2, 8), torch.zeros(2, 3), torch.zeros(2, 3)), ValueError,
     r"cos, sin: expected equal shapes.*D=8"),
]


@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_is_named_in_the_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
