"""Q-Former: equal to transformers' Blip2QFormerModel, the three attention masks, the preset's size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from nanomm.models.hub import read_hf_weights
from nanomm.models.multimodal_config import QFormerConfig, multimodal_preset
from nanomm.models.qformer import MASKS, QFormer, count_qformer_params, load_hf_qformer, multimodal_causal_mask

# float32 end to end on the same weights, three post-LN layers: differences are summation order only,
# a few ulp of O(1) activations; 1e-5 leaves two orders of margin and still catches any real change
ATOL = 1e-5
N_Q, D, CROSS, V, T = 5, 32, 24, 99, 6


def _tiny(**kw) -> QFormerConfig:
    fields = dict(vocab_size=V, max_positions=20, n_layer=3, n_head=4, dim=D, ff_dim=37, n_query=N_Q,
                  cross_dim=CROSS, dec_token_id=V - 1)
    return multimodal_preset("qformer-tiny", **{**fields, **kw})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random Blip2QFormerModel with text FFNs, saved and read back, and the nanomm Q-Former loaded from it."""
    hc = Blip2QFormerConfig(vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=20, cross_attention_frequency=2,
                            encoder_hidden_size=CROSS, use_qformer_text_input=True, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = Blip2QFormerModel(hc)
    with torch.no_grad():  # O(1) weights everywhere, so that every tensor matters to the output
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    folder = tmp_path_factory.mktemp("qformer")
    hf.save_pretrained(folder)
    hf = Blip2QFormerModel.from_pretrained(folder).eval()
    ours = QFormer(_tiny()).eval()
    load_hf_qformer(ours, read_hf_weights(folder))
    return hf, ours


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 7, CROSS, generator=g)
    ids = torch.randint(0, V, (2, T), generator=g)
    mask = torch.tensor([[1] * T, [1] * 4 + [0] * 2])
    return image, ids, mask


@pytest.mark.parametrize("mode", ["queries", "queries+text", "text"])
def test_equals_transformers(pair, mode):
    hf, ours = pair
    image, ids, mask = _inputs()
    queries = ours.query_tokens.expand(2, -1, -1)
    text = ours.embeddings.word(ids) + ours.embeddings.position.weight[:T]  # HF keeps these outside its Q-Former
    ones = torch.ones(2, N_Q, dtype=torch.long)
    with torch.no_grad():
        if mode == "queries":
            got = ours(image).last_hidden_state
            want = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        elif mode == "queries+text":
            got = ours(image, ids, mask).last_hidden_state
            want = hf(query_embeds=torch.cat([queries, text], 1), query_length=N_Q,
                      attention_mask=torch.cat([ones, mask], 1), encoder_hidden_states=image).last_hidden_state
        else:
            got = ours(None, ids, mask).last_hidden_state
            want = hf(query_embeds=text, query_length=0, attention_mask=mask).last_hidden_state
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_load_is_strict(pair):
    hf, _ = pair
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_hf_qformer(QFormer(_tiny()), {k: v for k, v in state.items() if "crossattention" not in k})
    with pytest.raises(ValueError, match="no place"):
        load_hf_qformer(QFormer(_tiny()), {**state, "encoder.layer.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        load_hf_qformer(QFormer(_tiny(cross_dim=CROSS + 1)), state)


def test_cross_attention_every_other_layer():
    model = QFormer(_tiny(n_layer=5))
    assert [hasattr(layer, "cross_attn") for layer in model.layers] == [True, False, True, False, True]


# ----------------------------------------------------------------------------- masks

def _outputs(model, image, ids, mask, kind):
    with torch.no_grad():
        out = model(image, ids, mask, mask=kind)
    return out.query_output, out.text_output


# (mask, what is changed, which output, whether it may change)
MASK_CASES = [
    ("unimodal", "text", "queries", False),       # ITC: the image side never reads the text
    ("unimodal", "image", "text", False),         # ... and the text side never reads the image
    ("bidirectional", "text", "queries", True),   # ITM: queries read the text
    ("bidirectional", "image", "text", True),     # ... and the text reads the queries
    ("multimodal_causal", "text", "queries", False),  # ITG: queries never see the text they help generate
    ("multimodal_causal", "image", "text", True),     # ... but the text sees the queries
    ("multimodal_causal", "last token", "text[:-1]", False),  # causal over the text
]


@pytest.mark.parametrize("kind, change, output, may_change", MASK_CASES)
def test_mask_information_flow(kind, change, output, may_change):
    torch.manual_seed(1)
    model = QFormer(_tiny()).eval()
    image, ids, _ = _inputs()
    mask = torch.ones_like(ids)
    image2, ids2 = image.clone(), ids.clone()
    if change == "image":
        image2 = image + torch.randn_like(image)
    elif change == "text":
        ids2[:, 1:] = (ids[:, 1:] + 1) % V
    else:
        ids2[:, -1] = (ids[:, -1] + 1) % V
    a, b = _outputs(model, image, ids, mask, kind), _outputs(model, image2, ids2, mask, kind)
    pick = {"queries": lambda o: o[0], "text": lambda o: o[1], "text[:-1]": lambda o: o[1][:, :-1]}[output]
    changed = not torch.allclose(pick(a), pick(b), atol=1e-6, rtol=0)
    assert changed == may_change


@settings(max_examples=25, deadline=None)
@given(n_query=st.integers(1, 4), lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_multimodal_causal_mask_rule(n_query, lengths):
    T = max(lengths)
    text_mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    m = multimodal_causal_mask(n_query, text_mask)  # (B, 1, N, N)
    for b, n in enumerate(lengths):
        for i in range(n_query + T):
            for j in range(n_query + T):
                real_key = j < n_query or j - n_query < n
                rule = (j < n_query) if i < n_query else (j < n_query or j <= i)
                assert bool(m[b, 0, i, j]) == (rule and real_key)


def test_mask_names_are_checked():
    model = QFormer(_tiny())
    image, ids, mask = _inputs()
    with pytest.raises(ValueError, match="mask: expected one of"):
        model(image, ids, mask, mask="causal")
    assert set(MASKS) == {"unimodal", "bidirectional", "multimodal_causal"}


@pytest.mark.parametrize("call, match", [
    (lambda m: m(), "at least one"),
    (lambda m: m(torch.randn(2, 7, CROSS + 1)), "cross_dim"),
    (lambda m: m(torch.randn(2, 7, CROSS), torch.zeros(3, 4, dtype=torch.long)), "batch"),
    (lambda m: m(None, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5)), "attention_mask"),
    (lambda m: m(None, torch.zeros(2, 21, dtype=torch.long)), "max_positions"),
])
def test_input_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(QFormer(_tiny()))


# ----------------------------------------------------------------------------- size

def test_preset_is_257_to_32():
    c = multimodal_preset("blip2-qformer")
    assert (c.n_query, c.dim, c.cross_dim, c.vocab_size) == (32, 768, 1408, 30523)
    model = QFormer(_tiny()).eval()
    out = model(torch.randn(2, 257, CROSS))  # any number of image tokens in, n_query out
    assert out.query_output.shape == (2, N_Q, D)


@pytest.mark.parametrize("name", ["blip2-qformer", "qformer-tiny"])
def test_analytic_count_equals_modules(name):
    c = multimodal_preset(name)
    with torch.device("meta"):
        model = QFormer(c)
    assert count_qformer_params(c)["total"] == sum(p.numel() for p in model.parameters())


def test_preset_count_is_lavis():
    parts = count_qformer_params(multimodal_preset("blip2-qformer"))
    assert parts["total"] == 186_307_387  # LAVIS Blip2Qformer: BertLMHeadModel + 32 × 768 queries
    # what stage 2 keeps: no word/position embeddings, no text FFNs, no LM head
    kept = parts["total"] - parts["text_ffn"] - parts["lm_head"] - (30523 + 512) * 768
    assert kept == 105_162_240
