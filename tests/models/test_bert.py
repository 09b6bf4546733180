"""BERT against transformers' BertForPreTraining / BertModel, and the embedding the notes leave out."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models import BertConfig, BertForPreTraining, BertModel, build, from_hf, preset
from nanomm.models.bert import truncated_normal_

# float32 with two tiny layers: nanomm and transformers differ only in summation order (~1e-7);
# 1e-5 leaves two orders of magnitude of room and still catches any wrong op (errors ~1e-2 and up)
ATOL = 1e-5


def _close(a, b, keep=None):
    if keep is not None:
        a, b = a[keep], b[keep]
    return torch.allclose(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def pair(hf_tiny):
    folder, hf = hf_tiny("bert")
    return from_hf(folder), hf


def test_pretraining_outputs_equal_transformers_with_padding(pair, make_batch):
    ours, hf = pair
    ids, mask = make_batch(3, 9, side="right")
    types = torch.zeros_like(ids)
    types[:, 5:] = 1  # sentence B
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    keep = mask.bool()
    assert isinstance(ours, BertForPreTraining)
    assert _close(a.prediction_logits, b.prediction_logits, keep)
    assert _close(a.seq_relationship_logits, b.seq_relationship_logits)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    assert all(_close(x, y, keep) for x, y in zip(a.hidden_states, b.hidden_states))


def test_base_model_with_pooler_equals_transformers(hf_tiny, make_batch):
    folder, hf = hf_tiny("bert-base-model")
    ours = from_hf(folder)
    ids, mask = make_batch(2, 7)
    with torch.no_grad():
        a, b = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert isinstance(ours, BertModel)
    assert _close(a.last_hidden_state, b.last_hidden_state, mask.bool())
    assert _close(a.pooler_output, b.pooler_output)


def test_embedding_is_layernorm_of_the_three_sums(pair):
    ours, _ = pair
    emb = ours.bert.embeddings
    ids = torch.tensor([[5, 6, 7, 8]])
    types = torch.tensor([[0, 0, 1, 1]])
    raw = emb.word.weight[ids] + emb.token_type.weight[types] + emb.position.weight[:4]  # the notes' sum
    expected = torch.nn.functional.layer_norm(raw, (raw.shape[-1],), emb.norm.weight, emb.norm.bias, eps=1e-12)
    with torch.no_grad():
        got = emb(ids, types)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, raw, atol=1e-2)  # the notes' snippet (no LayerNorm) is a different function


def test_embedding_dropout_acts_in_training_only():
    model = build(preset("bert-tiny", dropout=0.5))
    ids = torch.randint(0, 100, (2, 6))
    model.train()
    assert not torch.equal(model.bert.embeddings(ids), model.bert.embeddings(ids))
    model.eval()
    assert torch.equal(model.bert.embeddings(ids), model.bert.embeddings(ids))


def test_init_is_truncated_normal_002():
    torch.manual_seed(0)
    model = build(preset("bert-tiny"))
    w = model.bert.embeddings.word.weight.detach()
    assert w.abs().max() <= 0.04  # truncated at 2σ
    # std of a normal truncated at ±2σ is 0.8796σ; 500k samples pin it to about ±0.2%
    assert abs(w.std().item() - 0.8796 * 0.02) < 0.0005
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_truncated_normal_has_the_truncated_moments():
    torch.manual_seed(1)
    w = truncated_normal_(torch.empty(200_000), std=1.0)
    assert w.abs().max() <= 2.0 and abs(w.mean()) < 0.01 and abs(w.std() - 0.8796) < 0.01


def test_mlm_decoder_is_tied_to_the_token_embedding(pair):
    ours, _ = pair
    assert ours.mlm.decoder.weight is ours.bert.embeddings.word.weight


@settings(max_examples=8, deadline=None)
@given(length=st.integers(1, 8), pad=st.integers(1, 6))
def test_padding_does_not_change_real_tokens(length, pad, pair):
    ours, _ = pair
    torch.manual_seed(length)
    ids = torch.randint(1, 99, (1, length))
    padded = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, pad)], 1).long()
    with torch.no_grad():
        alone = ours.bert(ids).last_hidden_state
        batch = ours.bert(padded, attention_mask=mask).last_hidden_state[:, :length]
    assert torch.allclose(alone, batch, atol=ATOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(1, 300, dtype=torch.long)), "max_positions=256"),
    (dict(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 6)), "attention_mask"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(2, 5)), "input_ids"),
])
def test_bad_inputs_are_named(kwargs, match):
    model = build(preset("bert-tiny"))
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_wrong_config_type_is_rejected():
    with pytest.raises(TypeError, match="BertConfig"):
        BertModel(preset("gpt-tiny"))
    assert isinstance(build(BertConfig(n_layer=1, dim=16, n_head=2, ff_dim=8, vocab_size=10, task="base")), BertModel)
