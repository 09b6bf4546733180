"""Causal-LM data: blocks shifted by one, deterministic splits, a seeded and resumable batch order."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.data.corpus import load_corpus
from nanomm.data.lm import Batcher, LMBatches, TokenBlocks, encode_documents, train_val_split
from nanomm.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def docs():
    return load_corpus("pydoc").documents[:12]


@pytest.fixture(scope="module")
def bpe(docs):
    return train_tokenizer(docs, "bpe", vocab_size=600)


def test_documents_end_with_end_of_text_and_decode_back(docs, bpe):
    ids = encode_documents(docs, bpe)
    assert len(ids) == len(docs)
    for text, row in zip(docs, ids):
        assert row[-1] == bpe.eos_id and bpe.eos_id not in row[:-1]
        assert bpe.decode(row[:-1].tolist()) == text  # byte-level BPE loses nothing


@pytest.mark.parametrize("n,block,expected", [(11, 5, 2), (10, 5, 1), (6, 5, 1), (100, 1, 99)])
def test_block_count(n, block, expected):
    assert len(TokenBlocks(np.arange(n), block)) == expected


def test_blocks_are_shifted_by_one_and_contiguous():
    blocks = TokenBlocks(np.arange(1000) * 3, 16)
    x, y = blocks.get(np.arange(len(blocks)))
    assert x.shape == y.shape == (len(blocks), 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x one step ahead
    assert torch.equal(y[:-1, -1], x[1:, 0])  # the last target of a block is the first input of the next
    assert torch.equal(x.flatten(), torch.arange(len(blocks) * 16) * 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: TokenBlocks(np.arange(5), 5), ValueError, "stream: expected at least block_size \\+ 1 = 6 tokens, got 5"),
    (lambda: TokenBlocks(np.arange(50), 0), ValueError, "block_size: expected a positive int, got 0"),
    (lambda: TokenBlocks(np.zeros((3, 9)), 2), ValueError, r"stream: expected a 1-D sequence .* shape \(3, 9\)"),
    (lambda: TokenBlocks(np.arange(50), 4).get([12]), IndexError, r"indices: expected a 1-D array of ints in \[0, 12\)"),
    (lambda: Batcher(3, 4), ValueError, "batch_size: expected at most n = 3 items when drop_last=True, got 4"),
    (lambda: train_val_split([np.arange(5)], by="random"), ValueError, r"by: expected one of \['document', 'fraction'\]"),
    (lambda: train_val_split([np.arange(5)], val_fraction=1.0), ValueError, r"val_fraction: expected a number in \(0, 1\)"),
    (lambda: train_val_split([np.arange(5)]), ValueError, "leaves none for training"),
])
def test_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _docs(n):
    return [np.arange(10 * i, 10 * i + 3 + i % 4) for i in range(n)]  # distinct contents, varied lengths


def test_split_by_document_is_whole_documents(docs, bpe):
    ids = encode_documents(docs, bpe)
    train, val = train_val_split(ids, val_fraction=0.25, seed=3)
    assert len(train) + len(val) == sum(map(len, ids))
    pieces = [d.tolist() for d in ids]
    # each split is a concatenation of whole documents, in corpus order
    train_docs = _cover(train.tolist(), pieces)
    val_docs = _cover(val.tolist(), pieces)
    assert len(val_docs) == math.ceil(0.25 * len(ids)) and not set(train_docs) & set(val_docs)
    again, _ = train_val_split(ids, val_fraction=0.25, seed=3)
    other, _ = train_val_split(ids, val_fraction=0.25, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def _cover(stream, pieces):
    """Indices of the documents whose concatenation, in increasing order, is ``stream``."""
    used, pos = [], 0
    for i, p in enumerate(pieces):
        if stream[pos:pos + len(p)] == p:
            used.append(i)
            pos += len(p)
    assert pos == len(stream)
    return used


@pytest.mark.parametrize("frac", [0.1, 0.33])
def test_split_by_fraction_is_the_tail(frac):
    docs = _docs(9)
    whole = np.concatenate(docs)
    train, val = train_val_split(docs, val_fraction=frac, by="fraction")
    assert len(val) == math.ceil(frac * len(whole))
    assert np.array_equal(np.concatenate([train, val]), whole)


@pytest.mark.parametrize("n,batch,drop", [(10, 3, True), (10, 3, False), (7, 7, True)])
def test_every_epoch_is_a_permutation(n, batch, drop):
    b = Batcher(n, batch, seed=1, drop_last=drop)
    epochs = []
    for _ in range(3):
        epochs.append(np.concatenate([next(b) for _ in range(len(b))]))
    expected = n - n % batch if drop else n
    for e in epochs:
        assert len(e) == expected and len(set(e.tolist())) == expected and e.max() < n
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # a fresh order each epoch
    assert b.epoch == 2


def test_order_depends_on_the_seed():
    first = [next(Batcher(100, 10, seed=s)).tolist() for s in (0, 0, 1)]
    assert first[0] == first[1] != first[2]
    assert next(Batcher(5, 5, shuffle=False)).tolist() == [0, 1, 2, 3, 4]


@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 30), st.integers(1, 20), st.booleans())
@settings(max_examples=60, deadline=None)
def test_resume_equals_uninterrupted(n, batch, stop, more, drop):
    batch = min(batch, n)
    full = Batcher(n, batch, seed=7, drop_last=drop)
    expected = [(next(full).tolist(), full.batch_seed) for _ in range(stop + more)]
    first = Batcher(n, batch, seed=7, drop_last=drop)
    for _ in range(stop):
        next(first)
    resumed = Batcher(n, batch, seed=7, drop_last=drop)
    resumed.load_state_dict(dict(first.state_dict()))
    assert [(next(resumed).tolist(), resumed.batch_seed) for _ in range(more)] == expected[stop:]


def test_resume_refuses_other_data():
    state = Batcher(50, 5, seed=1).state_dict()
    with pytest.raises(ValueError, match="state: saved with batch_size=5, this batcher has 4"):
        Batcher(50, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing \\['position'\\]"):
        Batcher(50, 5).load_state_dict({"epoch": 0})


def test_lm_batches(docs, bpe):
    train, val = train_val_split(encode_documents(docs, bpe), val_fraction=0.2)
    stream = LMBatches(train, block_size=32, batch_size=4, seed=0)
    batch = next(stream)
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert stream.tokens_per_batch == 128
    evaluation = list(LMBatches(val, 32, 4).epoch_batches())
    assert sum(len(b["input_ids"]) for b in evaluation) == (len(val) - 1) // 32
    state = stream.state_dict()
    after = next(stream)
    again = LMBatches(train, 32, 4, seed=0)
    again.load_state_dict(state)
    assert torch.equal(next(again)["input_ids"], after["input_ids"])
