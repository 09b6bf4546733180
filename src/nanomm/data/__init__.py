"""Data: corpora that ship with Python or the project, tokenizers, causal-LM blocks, BERT's MLM and NSP.

  corpus.py     load_corpus("pydoc" | "docs" | "shakespeare" | a path) -> Corpus of documents
  tokenizer.py  train_tokenizer(texts, "bpe" | "wordpiece"), load_tokenizer, TextTokenizer
  lm.py         encode_documents -> train_val_split -> LMBatches (resumable Batcher)
  mlm.py        mask_tokens (BERT's 15% and 80/10/10), make_nsp_pairs, MLMBatches
"""

from nanomm.data.corpus import CORPORA, Corpus, corpus_names, load_corpus, split_sentences
from nanomm.data.lm import Batcher, LMBatches, TokenBlocks, encode_documents, train_val_split
from nanomm.data.mlm import (IGNORE_INDEX, MaskedLM, MaskingConfig, MLMBatches, NSPPair, collate_pairs,
                             make_nsp_pairs, mask_tokens, n_predictions, sentence_ids, wordpiece_word_ids)
from nanomm.data.tokenizer import TextTokenizer, load_tokenizer, minilm_path, minilm_tokenizer, train_tokenizer

__all__ = [
    "CORPORA", "Corpus", "corpus_names", "load_corpus", "split_sentences",
    "TextTokenizer", "train_tokenizer", "load_tokenizer", "minilm_path", "minilm_tokenizer",
    "Batcher", "LMBatches", "TokenBlocks", "encode_documents", "train_val_split",
    "IGNORE_INDEX", "MaskedLM", "MaskingConfig", "MLMBatches", "NSPPair", "collate_pairs", "make_nsp_pairs",
    "mask_tokens", "n_predictions", "sentence_ids", "wordpiece_word_ids",
]
