"""The cross-encoder on nanomm's BERT equals transformers' BertForSequenceClassification (random tiny weights)."""

import numpy as np
import pytest

from nanomm.rag.crossencoder import CrossEncoder
from nanomm.rag.rerank import CrossEncoderReranker

PAIRS = [("what is bm25", "bm25 ranks documents by term frequency"), ("what is bm25", "rmsnorm rescales"),
         ("rope", "rotary position embedding rotates q and k by position and more words here")]


def tiny_folder(tmp_path, num_labels):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for q, p in PAIRS for w in (q + " " + p).split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref, tok


@pytest.mark.parametrize("num_labels", [1, 2])
def test_cross_encoder_equals_transformers(tmp_path, num_labels):
    import torch

    ref, tok = tiny_folder(tmp_path, num_labels)
    ours = CrossEncoder.from_dir(tmp_path).predict(PAIRS)
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(PAIRS)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([e.ids for e in enc]), attention_mask=torch.tensor([e.attention_mask for e in enc]),
                     token_type_ids=torch.tensor([e.type_ids for e in enc])).logits
    expected = logits[:, 0] if num_labels == 1 else logits[:, 1] - logits[:, 0]
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)  # float32, same weights: rounding only


def test_reranker_orders_candidates_by_the_cross_encoder(tmp_path):
    tiny_folder(tmp_path, 1)
    ce = CrossEncoder.from_dir(tmp_path)
    texts = [p for _, p in PAIRS]
    scores = ce.predict([("what is bm25", t) for t in texts])
    out = CrossEncoderReranker(ce.predict).rerank_texts("what is bm25", [(10, 0.0), (11, 0.0), (12, 0.0)], texts)
    assert [d for d, _ in out] == [10 + int(i) for i in np.argsort(-scores, kind="stable")]
    with pytest.raises(ValueError, match="pairs"):
        ce.predict([])


def test_a_folder_without_a_classifier_is_rejected(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertForSequenceClassification"):
        CrossEncoder.from_dir(tmp_path)
